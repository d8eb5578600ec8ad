"""Pic2WordMapper and Phi: layer order, key names, dims."""

import pytest
import torch
import torch.nn.functional as F

from cirlab.models.mappers import Phi, Pic2WordMapper


def test_pic2word_keys_and_formula():
    torch.manual_seed(0)
    m = Pic2WordMapper(16, 32, 24).eval()
    sd = m.state_dict()
    assert set(sd) == {"layers.0.0.weight", "layers.0.0.bias", "layers.1.0.weight", "layers.1.0.bias",
                       "fc_out.weight", "fc_out.bias"}
    x = torch.randn(5, 16)
    h = torch.relu(F.linear(x, sd["layers.0.0.weight"], sd["layers.0.0.bias"]))
    h = torch.relu(F.linear(h, sd["layers.1.0.weight"], sd["layers.1.0.bias"]))
    ref = F.linear(h, sd["fc_out.weight"], sd["fc_out.bias"])
    torch.testing.assert_close(m(x), ref, atol=1e-6, rtol=0)
    assert m(x).shape == (5, 24)
    # Dropout sits before the ReLU inside each block, with p = 0.1 by default.
    assert [type(b).__name__ for b in m.layers[0]] == ["Linear", "Dropout", "ReLU"]
    assert m.layers[0][1].p == pytest.approx(0.1)


def test_phi_keys_and_formula():
    torch.manual_seed(1)
    phi = Phi(16, 64, 12).eval()
    sd = phi.state_dict()
    assert set(sd) == {f"layers.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
    x = torch.randn(7, 16)
    h = F.gelu(F.linear(x, sd["layers.0.weight"], sd["layers.0.bias"]))
    h = F.gelu(F.linear(h, sd["layers.3.weight"], sd["layers.3.bias"]))
    ref = F.linear(h, sd["layers.6.weight"], sd["layers.6.bias"])
    torch.testing.assert_close(phi(x), ref, atol=1e-6, rtol=0)
    assert phi.layers[2].p == pytest.approx(0.5) and phi.layers[5].p == pytest.approx(0.5)


def test_phi_dropout_in_train_mode():
    torch.manual_seed(2)
    phi = Phi(8, 64, 8, dropout=0.5).train()
    x = torch.randn(4, 8)
    assert not torch.allclose(phi(x), phi(x))
    phi.eval()
    torch.testing.assert_close(phi(x), phi(x))


def test_bad_dims():
    with pytest.raises(ValueError, match="hidden_dim"):
        Phi(8, 0, 8)
    with pytest.raises(ValueError, match="output_dim"):
        Pic2WordMapper(8, 8, -1)
