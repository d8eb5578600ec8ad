"""Optimizers and schedules built from recipe sections."""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn

from cirlab.train.config import OptimizerConfig, SchedulerConfig

_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimizerConfig,
                 ndims: Optional[dict[str, int]] = None) -> list[dict]:
    """Trainable parameters, split so that biases and norm weights skip decay when asked (Pic2Word).

    `ndims` gives each parameter's rank by its name without wrapper parts (train/strategies.py): under
    FSDP a parameter is a flat 1-D shard, and its own `ndim` would put every weight in no-decay.
    """
    from cirlab.train.strategies import clean_name

    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        name = clean_name(name)
        ndim = ndims.get(name, p.ndim) if ndims else p.ndim
        if cfg.no_decay_on_bias_and_norm and (ndim < 2 or "bn" in name or "ln" in name or "norm" in name
                                              or name.endswith(".bias") or "logit_scale" in name):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimizerConfig,
                    ndims: Optional[dict[str, int]] = None) -> torch.optim.Optimizer:
    """The recipe's optimizer over the trainable parameters; an unknown name is an error."""
    name = cfg.name.lower()
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.name!r}; choose one of {sorted(_OPTIMIZERS)}")
    groups = param_groups(named_params, cfg, ndims)
    if not any(g["params"] for g in groups):
        raise ValueError("nothing to train: every parameter is frozen (check the recipe's freeze/lora keys)")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.betas[0])
    fused = cfg.fused
    if fused is None:
        # on the CPU the default AdamW walks each tensor in Python-level steps (foreach is off there):
        # 18 ms a step for the demo CLIP's 3.4 M parameters, 2.7 ms fused (benchmarks/RESULTS.md);
        # accelerators keep torch's own default (foreach), which the strategies are tested with
        fused = all(p.device.type == "cpu" and p.dtype.is_floating_point for g in groups for p in g["params"])
    return _OPTIMIZERS[name](groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def lr_lambda(cfg: SchedulerConfig, total_steps: int):
    """Multiplier of the base lr at a step: linear warm-up, then constant, cosine or linear decay."""
    name = cfg.name.lower()
    if name not in ("constant", "cosine", "linear"):
        raise ValueError(f"unknown scheduler {cfg.name!r}; choose constant, cosine or linear")
    warm = max(0, cfg.warmup_steps)
    total = max(total_steps, warm + 1)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if name == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            factor = 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * factor

    return f
