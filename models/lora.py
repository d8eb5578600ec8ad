"""LoRA adapters on open_clip transformer towers through peft, and the merged (LoRA-free) state dict.

`apply_lora` injects peft LoRA layers into the attention (optionally the MLP) of chosen resblocks of
chosen towers; `merged_state_dict` returns the open_clip-format state dict with the LoRA deltas folded
into the base weights, loadable by a plain open_clip model. The Backbone wrapper calls both.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

LORA_OPTIONS = ("r", "alpha", "dropout", "towers", "blocks", "mlp")


@dataclass
class LoraTower:
    """Where one tower lives in the open_clip model: its resblock stack's name prefix, the stack, its params."""

    prefix: str
    stack: nn.Module
    parameters: list[nn.Parameter]


def check_lora_options(lora: dict) -> dict:
    """Refuse unknown LoRA option names (a typo would silently train a different adapter)."""
    unknown = set(lora) - set(LORA_OPTIONS)
    if unknown:
        raise ValueError(f"unknown LoRA option(s) {sorted(unknown)}; allowed: {sorted(LORA_OPTIONS)}")
    return dict(lora)


def _block_pattern(name: str, tower: LoraTower, blocks: Sequence[int] | None, mlp: bool) -> str:
    """Regex over module names selecting the attention (and MLP) linears of the chosen blocks."""
    n = len(tower.stack.resblocks)
    if not isinstance(tower.stack.resblocks[0].attn, nn.MultiheadAttention):
        raise NotImplementedError(f"LoRA needs nn.MultiheadAttention blocks; the {name} tower uses "
                                  f"{type(tower.stack.resblocks[0].attn).__name__}")
    if blocks is None:
        idx = list(range(n))
    else:
        wrong = [b for b in blocks if not -n <= int(b) < n]
        if wrong:
            raise ValueError(f"LoRA blocks {wrong} out of range for the {name} tower ({n} blocks)")
        idx = sorted({int(b) % n for b in blocks})
    targets = "attn|mlp\\.c_fc|mlp\\.c_proj" if mlp else "attn"
    return f"{re.escape(tower.prefix)}\\.resblocks\\.({'|'.join(map(str, idx))})\\.({targets})"


def apply_lora(model: nn.Module, towers: dict[str, LoraTower], r: int = 8, alpha: int = 16,
               dropout: float = 0.0, blocks: Sequence[int] | None = None, mlp: bool = False) -> dict:
    """Inject LoRA into `towers` of `model`; returns the config applied (a plain dict, for repr/export).

    Afterwards only the LoRA parameters of those towers are trainable; every other parameter keeps its
    requires_grad (peft would freeze the whole model). Outputs are unchanged at init (lora_B is zero).
    """
    from peft import LoraConfig, inject_adapter_in_model

    if int(r) < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    patterns = [_block_pattern(name, tower, blocks, mlp) for name, tower in towers.items()]
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    config = LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=float(dropout), bias="none",
                        target_modules="|".join(f"(?:{p})" for p in patterns))
    inject_adapter_in_model(config, model)

    tower_ids = {id(p) for tower in towers.values() for p in tower.parameters}
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
        elif id(p) in tower_ids:
            p.requires_grad_(False)
        else:
            p.requires_grad_(before.get(name, p.requires_grad))
    return dict(r=int(r), alpha=alpha, dropout=float(dropout), towers=list(towers),
                blocks=None if blocks is None else list(blocks), mlp=bool(mlp))


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state dict with LoRA deltas merged in and peft's names removed (the original keys)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import MultiheadAttention as LoraMHA

    if not any(isinstance(m, LoraLayer) for m in model.modules()):
        return {k: v.detach() for k, v in model.state_dict().items()}
    model = copy.deepcopy(model)
    done: list[str] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer) or any(name.startswith(d + ".") for d in done):
            continue  # e.g. the out_proj inside a LoRA MultiheadAttention, merged with it
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, LoraMHA):
            merged = module.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
        else:
            module.merge()
            merged = module.get_base_layer()
        setattr(parent, child, merged)
        done.append(name)
    return {k: v.detach() for k, v in model.state_dict().items()}
