"""Import checkpoints released by the reference repositories as cirlab modules.

Formats (checked against the reference code):
- ``clip4cir-combiner``: ``{'Combiner': state_dict}`` (CLIP4Cir stage 2), keys text_projection_layer,
  image_projection_layer, combiner_layer, output_layer, dynamic_scalar.{0,3}.
- ``pic2word``: ``{'state_dict_img2text': state_dict, 'state_dict': CLIP, ...}`` with a ``module.``
  prefix from DDP; keys layers.{i}.0, fc_out.
- ``searle-phi``: ``{'Phi': state_dict}`` (keys layers.{0,3,6}).
- ``lincir-phi``: ``{'epoch': int, 'Phi': state_dict}`` without prefix (saved after accelerate's
  unwrap_model) — the same layout as SEARLE, so these two kinds cannot be told apart by their keys.
A bare state dict (with or without ``module.``) is accepted for every kind. Dimensions are read from
the weights; the module is returned in eval mode, in float32 (fp16 releases are upcast).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from cirlab.models.combiner import Combiner
from cirlab.models.loading import CheckpointError, read_checkpoint, strip_module_prefix
from cirlab.models.mappers import Phi, Pic2WordMapper

# kind -> the top-level key that holds the module's state dict in the released file.
_WRAPPER_KEY = {"clip4cir-combiner": "Combiner", "pic2word": "state_dict_img2text",
                "searle-phi": "Phi", "lincir-phi": "Phi"}
# kind -> weight keys that must be present (their shapes give the dimensions).
_REQUIRED = {
    "clip4cir-combiner": ("text_projection_layer.weight", "image_projection_layer.weight",
                          "combiner_layer.weight", "output_layer.weight",
                          "dynamic_scalar.0.weight", "dynamic_scalar.3.weight"),
    "pic2word": ("layers.0.0.weight", "fc_out.weight"),
    "searle-phi": ("layers.0.weight", "layers.3.weight", "layers.6.weight"),
    "lincir-phi": ("layers.0.weight", "layers.3.weight", "layers.6.weight"),
}
KINDS = tuple(_WRAPPER_KEY)


def _load(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    """A file path (read by cirlab.models.loading.read_checkpoint) or a mapping -> a mapping."""
    if isinstance(path_or_state_dict, Mapping):
        return path_or_state_dict
    if not isinstance(path_or_state_dict, (str, os.PathLike)):
        raise TypeError(f"import_reference_checkpoint takes a file path or a state dict, "
                        f"got {type(path_or_state_dict).__name__}")
    obj = read_checkpoint(path_or_state_dict)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{os.fspath(path_or_state_dict)} holds a {type(obj).__name__}, not a checkpoint "
                              "dict or state dict", "pass the file the reference repository released")
    return obj


def _state_dict_of(obj: Mapping[str, Any], kind: str) -> dict[str, torch.Tensor]:
    """The module's state dict inside a released file (or the bare state dict itself)."""
    wrapper = _WRAPPER_KEY[kind]
    inner = obj.get(wrapper, obj)
    if not isinstance(inner, Mapping):
        raise ValueError(f"{kind} checkpoint: entry {wrapper!r} is a {type(inner).__name__}, not a state dict")
    return strip_module_prefix(inner)


def _looks_like(obj: Mapping[str, Any]) -> str | None:
    """Best guess of which kind a checkpoint is, for the wrong-kind error message."""
    for kind in KINDS:
        sd = _state_dict_of(obj, kind)
        if all(k in sd for k in _REQUIRED[kind]):
            if kind in ("searle-phi", "lincir-phi"):
                return "searle-phi or lincir-phi"
            return kind
    if "CLIP" in obj and "Combiner" not in obj:
        return "a CLIP4Cir stage-1 CLIP checkpoint (no Combiner in it)"
    return None


def _torch_sd(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Keep only tensors, upcast to float32 (fp16 releases)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _build(kind: str, sd: dict[str, torch.Tensor]) -> nn.Module:
    """Construct our module with dimensions read from the weights."""
    if kind == "clip4cir-combiner":
        proj, feat = sd["text_projection_layer.weight"].shape
        hidden = sd["combiner_layer.weight"].shape[0]
        return Combiner(feat, proj, hidden)
    if kind == "pic2word":
        n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
        hidden, inp = sd["layers.0.0.weight"].shape
        out = sd["fc_out.weight"].shape[0]
        return Pic2WordMapper(inp, hidden, out, num_layers=n_layers)
    hidden, inp = sd["layers.0.weight"].shape
    return Phi(inp, hidden, sd["layers.6.weight"].shape[0])


def import_reference_checkpoint(path_or_state_dict: str | os.PathLike | Mapping[str, Any], kind: str) -> nn.Module:
    """Load a checkpoint released by CLIP4Cir / Pic2Word / SEARLE / LinCIR as our module (eval mode)."""
    if kind not in _WRAPPER_KEY:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {', '.join(KINDS)}")
    obj = _load(path_or_state_dict)
    sd = _state_dict_of(obj, kind)
    missing = [k for k in _REQUIRED[kind] if k not in sd]
    if missing:
        guess = _looks_like(obj)
        hint = f"; it looks like {guess} — pass that kind" if guess else ""
        raise ValueError(f"checkpoint is not a {kind} checkpoint: missing keys {missing} "
                         f"(top-level keys: {sorted(obj)[:8]}){hint}")
    sd = _torch_sd(sd)
    model = _build(kind, sd)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{kind} checkpoint does not match the {kind} layout: {err}") from err
    return model.eval()
