"""Combiner: the METHODS.md formula, the released key layout, train-mode dropout."""

import pytest
import torch
import torch.nn.functional as F

from cirlab.models.combiner import Combiner


def formula(sd, image, text):
    """Plain-torch computation of METHODS.md's Combiner formula (eval mode) from a state dict."""
    lin = lambda x, name: x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]
    t = torch.relu(lin(text, "text_projection_layer"))
    i = torch.relu(lin(image, "image_projection_layer"))
    c = torch.cat([t, i], dim=-1)
    mixed = lin(torch.relu(lin(c, "combiner_layer")), "output_layer")
    lam = torch.sigmoid(lin(torch.relu(lin(c, "dynamic_scalar.0")), "dynamic_scalar.3"))
    out = mixed + lam * text + (1 - lam) * image
    return out / out.norm(dim=-1, keepdim=True)


def test_matches_formula_and_is_normalised():
    torch.manual_seed(0)
    model = Combiner(16, 24, 40).eval()
    image, text = torch.randn(5, 16) * 3, torch.randn(5, 16) * 3
    out = model(image, text)
    ref = formula(model.state_dict(), image, text)
    assert out.shape == (5, 16)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5), atol=1e-6, rtol=0)


def test_text_first_and_lambda_weighs_text():
    # Make lambda ~1 (huge positive bias on the scalar head) and mixed = 0: the output is normalise(text).
    torch.manual_seed(1)
    model = Combiner(8, 12, 20).eval()
    with torch.no_grad():
        model.output_layer.weight.zero_()
        model.output_layer.bias.zero_()
        model.dynamic_scalar[3].weight.zero_()
        model.dynamic_scalar[3].bias.fill_(50.0)
    image, text = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(model(image, text), F.normalize(text, dim=-1), atol=1e-6, rtol=0)
    # Swapping the arguments must change the result (the branches are not symmetric).
    model2 = Combiner(8, 12, 20).eval()
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    assert not torch.allclose(model2(x, y), model2(y, x), atol=1e-4)


def test_released_key_names():
    keys = set(Combiner(4, 6, 10).state_dict())
    expected = {f"{n}.{p}" for n in ("text_projection_layer", "image_projection_layer", "combiner_layer",
                                     "output_layer", "dynamic_scalar.0", "dynamic_scalar.3")
                for p in ("weight", "bias")}
    assert keys == expected


def test_dropout_active_in_train_only():
    torch.manual_seed(2)
    model = Combiner(8, 32, 64, dropout=0.5)
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    model.train()
    a, b = model(image, text), model(image, text)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(image, text), model(image, text))


def test_bad_shapes_raise():
    model = Combiner(8, 12, 20)
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(2, 8), torch.randn(2, 7))
    with pytest.raises(ValueError, match="projection_dim"):
        Combiner(8, 0, 20)
