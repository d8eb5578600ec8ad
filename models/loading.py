"""Checkpoint files: the one reader every cirlab loader uses, and loading a file into an open_clip model.

`read_checkpoint` reads safetensors or torch.save files with ``weights_only=True`` (memory-mapped when
the file format allows it); `unwrap_state_dict` finds the state dict inside the known wrappers
(``{'CLIP': sd}`` of CLIP4Cir stage 1, ``{'state_dict': sd}``) and `strip_module_prefix` removes a
DDP/DataParallel ``module.`` prefix. `load_into_open_clip` applies open_clip's own conversion steps
(the ones `open_clip.load_checkpoint` runs) to the state dict already in memory, so a file is read once.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from cirlab.errors import CirlabError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# scalar entries of OpenAI's JIT state dicts that are not parameters
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class CheckpointError(CirlabError, ValueError):
    """A file that is not a readable checkpoint, or one that does not fit the model (a user error)."""


def looks_like_path(value: str) -> bool:
    """True when `value` names a file rather than an open_clip pretrained tag."""
    return (os.sep in value or "/" in value or value.lower().endswith(CHECKPOINT_SUFFIXES)
            or os.path.exists(value))


def read_checkpoint(path: str | os.PathLike) -> Any:
    """The object stored in a checkpoint file (safetensors, or torch.save loaded with weights only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({type(e).__name__})",
                                  "pass a file written by safetensors.torch.save_file") from None
    try:
        try:  # mmap: no copy of a multi-GB file in memory before the weights reach the model
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            # the legacy (non-zip) torch.save format cannot be memory-mapped
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, i.e. running arbitrary pickled code: never shown
        raise CheckpointError(
            f"{str(path)!r} holds Python objects other than tensors and plain containers, which cirlab does "
            "not unpickle (it loads checkpoints with weights_only=True)",
            "re-save only the state dict, e.g. torch.save(ckpt['state_dict'], 'weights.pt'), and pass that") from None
    except Exception as e:
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint ({type(e).__name__})",
                              "pass a state dict saved with torch.save or safetensors") from None


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a DDP/DataParallel ``module.`` prefix when every key carries it."""
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor state dict inside `obj`: under 'CLIP' or 'state_dict', without ``module.`` or JIT scalars."""
    if isinstance(obj, Mapping) and isinstance(obj.get("CLIP"), Mapping):
        obj = obj["CLIP"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source} holds no state dict (found {type(obj).__name__})",
                              "expected an open_clip/OpenAI state dict, optionally under 'CLIP' or 'state_dict'")
    sd = {k: v for k, v in strip_module_prefix(obj).items() if k not in OPENAI_EXTRA_KEYS}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries {bad[:5]} are not tensors", "expected a state dict")
    return sd


def _convert_like_open_clip(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip.load_checkpoint's conversion steps for a state dict already in memory (same helpers)."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    state_dict = convert_state_dict(model, dict(state_dict))
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in state_dict and own is not None and own.ndim != state_dict[key].ndim:
            state_dict[key] = state_dict[key].reshape(own.shape)
    if getattr(model, "logit_bias", None) is not None and "logit_bias" not in state_dict:
        state_dict["logit_bias"] = torch.zeros_like(state_dict["logit_scale"])
    state_dict.pop("text.transformer.embeddings.position_ids", None)
    resize_pos_embed(state_dict, model)
    resize_text_pos_embed(state_dict, model)
    return state_dict


def load_into_open_clip(model: nn.Module, path: str | os.PathLike, model_name: str = "") -> None:
    """Load a local checkpoint (open_clip, OpenAI or CLIP4Cir format, torch or safetensors) into `model`."""
    state_dict = unwrap_state_dict(read_checkpoint(path), f"checkpoint {os.fspath(path)!r}")
    try:
        model.load_state_dict(_convert_like_open_clip(model, state_dict), strict=True)
    except (RuntimeError, AssertionError, KeyError) as e:  # strict key/shape mismatch, pos-embed resize asserts
        first = (str(e).strip() or type(e).__name__).splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:600]
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} does not fit model {model_name!r}: {detail} ...",
            "pass the model name the checkpoint was trained with (OpenAI / CLIP4Cir weights use QuickGELU: "
            "choose the '-quickgelu' variant, e.g. 'RN50x4-quickgelu')") from e


class quiet_random_init:
    """Silence open_clip's random-init warning while the weights are about to come from a file."""

    def __enter__(self) -> "quiet_random_init":
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger().setLevel(self.level)
