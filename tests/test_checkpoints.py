"""import_reference_checkpoint: released layouts built independently, outputs vs plain torch."""

import pytest
import torch
import torch.nn.functional as F

from cirlab.models.checkpoints import import_reference_checkpoint
from cirlab.models.combiner import Combiner
from cirlab.models.mappers import Phi, Pic2WordMapper


def linear(g, out_dim, in_dim, prefix):
    return {f"{prefix}.weight": torch.randn(out_dim, in_dim, generator=g) * 0.2,
            f"{prefix}.bias": torch.randn(out_dim, generator=g) * 0.2}


def combiner_sd(d=12, p=20, h=36, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    sd.update(linear(g, p, d, "text_projection_layer"))
    sd.update(linear(g, p, d, "image_projection_layer"))
    sd.update(linear(g, h, 2 * p, "combiner_layer"))
    sd.update(linear(g, d, h, "output_layer"))
    sd.update(linear(g, h, 2 * p, "dynamic_scalar.0"))
    sd.update(linear(g, 1, h, "dynamic_scalar.3"))
    return sd


def phi_sd(d=10, h=40, t=14, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {**linear(g, h, d, "layers.0"), **linear(g, h, h, "layers.3"), **linear(g, t, h, "layers.6")}


def pic2word_sd(d=10, h=16, t=14, seed=2):
    g = torch.Generator().manual_seed(seed)
    sd = {**linear(g, h, d, "layers.0.0"), **linear(g, h, h, "layers.1.0"), **linear(g, t, h, "fc_out")}
    return {"module." + k: v for k, v in sd.items()}  # DDP prefix, as released


def lin(x, sd, name):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def test_combiner_released_file(tmp_path):
    sd = combiner_sd()
    path = tmp_path / "combiner.pt"
    torch.save({"epoch": 3, "Combiner": sd}, path)
    model = import_reference_checkpoint(path, "clip4cir-combiner")
    assert isinstance(model, Combiner) and not model.training
    assert (model.feature_dim, model.projection_dim, model.hidden_dim) == (12, 20, 36)
    img, txt = torch.randn(6, 12), torch.randn(6, 12)
    t, i = torch.relu(lin(txt, sd, "text_projection_layer")), torch.relu(lin(img, sd, "image_projection_layer"))
    c = torch.cat([t, i], -1)
    lam = torch.sigmoid(lin(torch.relu(lin(c, sd, "dynamic_scalar.0")), sd, "dynamic_scalar.3"))
    ref = F.normalize(lin(torch.relu(lin(c, sd, "combiner_layer")), sd, "output_layer") + lam * txt
                      + (1 - lam) * img, dim=-1)
    torch.testing.assert_close(model(img, txt), ref, atol=1e-6, rtol=0)


def test_pic2word_released_file_with_prefix_and_fp16(tmp_path):
    sd = pic2word_sd()
    path = tmp_path / "pic2word.pt"
    half = {k: v.half() for k, v in sd.items()}  # released weights may be fp16
    torch.save({"epoch": 30, "name": "x", "state_dict": {"module.logit_scale": torch.tensor(4.6)},
                "state_dict_img2text": half}, path)
    model = import_reference_checkpoint(path, "pic2word")
    assert isinstance(model, Pic2WordMapper)
    s = {k[len("module."):]: v.half().float() for k, v in sd.items()}
    x = torch.randn(4, 10)
    ref = lin(torch.relu(lin(torch.relu(lin(x, s, "layers.0.0")), s, "layers.1.0")), s, "fc_out")
    torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["searle-phi", "lincir-phi"])
def test_phi_kinds(tmp_path, kind):
    sd = phi_sd()
    path = tmp_path / "phi.pt"
    torch.save({"epoch": 5, "Phi": sd} if kind == "lincir-phi" else {"Phi": sd}, path)
    model = import_reference_checkpoint(path, kind)
    assert isinstance(model, Phi) and not model.training
    x = torch.randn(3, 10)
    ref = lin(F.gelu(lin(F.gelu(lin(x, sd, "layers.0")), sd, "layers.3")), sd, "layers.6")
    torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)
    assert model(x).shape == (3, 14)


def test_bare_state_dict_and_ddp_prefix():
    sd = phi_sd()
    a = import_reference_checkpoint(sd, "lincir-phi")
    b = import_reference_checkpoint({"module." + k: v for k, v in sd.items()}, "searle-phi")
    x = torch.randn(2, 10)
    torch.testing.assert_close(a(x), b(x))
    c = import_reference_checkpoint({k[len("module."):]: v for k, v in pic2word_sd().items()}, "pic2word")
    assert isinstance(c, Pic2WordMapper)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        import_reference_checkpoint(tmp_path / "nope.pt", "searle-phi")
    with pytest.raises(ValueError, match="clip4cir-combiner.*pic2word.*searle-phi.*lincir-phi"):
        import_reference_checkpoint(phi_sd(), "phi")
    with pytest.raises(ValueError, match=r"not a searle-phi checkpoint.*layers\.0\.weight.*looks like pic2word"):
        import_reference_checkpoint({"state_dict_img2text": pic2word_sd()}, "searle-phi")
    with pytest.raises(ValueError, match=r"not a clip4cir-combiner.*looks like searle-phi or lincir-phi"):
        import_reference_checkpoint({"Phi": phi_sd()}, "clip4cir-combiner")
    # Right keys, inconsistent shapes -> a clear ValueError, not a raw RuntimeError.
    bad = combiner_sd()
    bad["output_layer.weight"] = torch.randn(5, 36)
    with pytest.raises(ValueError, match="clip4cir-combiner"):
        import_reference_checkpoint({"Combiner": bad}, "clip4cir-combiner")


def test_non_weights_only_file_is_refused_clearly(tmp_path):
    import argparse
    path = tmp_path / "with_args.pt"
    torch.save({"args": argparse.Namespace(lr=1.0), "Phi": phi_sd()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        import_reference_checkpoint(path, "searle-phi")
