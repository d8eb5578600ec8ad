"""Typed recipe sections shared by every task.

Dataclasses (not dicts) so that jsonargparse rejects a recipe key that does not exist, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class LoraConfig:
    """LoRA through peft on the attention (and optionally MLP) of chosen towers and blocks."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    towers: list[str] = field(default_factory=lambda: ["image", "text"])
    blocks: Optional[list[int]] = None


@dataclass
class BackboneConfig:
    """Which open_clip model to wrap and how (see cirlab.models.Backbone)."""

    model_name: str = "cirlab-tiny"
    pretrained: Optional[str] = None  # open_clip tag, local checkpoint path, or None (random init)
    freeze_image: bool = False
    freeze_text: bool = False
    grad_checkpointing: bool = False
    lora: Optional[LoraConfig] = None
    image_transform: str = "clip"  # clip | targetpad | squarepad
    train_scale: Optional[list[float]] = None  # RandomResizedCrop scale for kind "clip" in training

    def __post_init__(self) -> None:
        # `--model.init_args.backbone.pretrained=null` reaches here as the string "None" (LightningCLI's
        # nested subclass parsing): it means random init, not an open_clip tag named "None"
        if isinstance(self.pretrained, str) and self.pretrained.strip().lower() in ("", "none", "null", "~"):
            self.pretrained = None


@dataclass
class OptimizerConfig:
    """Optimizer from the recipe; defaults differ per method (each task sets the reference ones)."""

    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    no_decay_on_bias_and_norm: bool = False
    fused: Optional[bool] = None  # adam/adamw: one fused kernel per step; None = when every parameter is on the CPU


@dataclass
class SchedulerConfig:
    """Learning-rate schedule stepped every optimizer step."""

    name: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0
    total_steps: Optional[int] = None  # None: the trainer's estimated total steps
    min_lr_ratio: float = 0.0


@dataclass
class EvalConfig:
    """How evaluation ranks: top-K kept per query and the encoding batch size."""

    top_k: int = 50
    batch_size: int = 128
    query_chunk: int = 1024
    gallery_chunk: int = 65536
    submission_dir: Optional[str] = None  # where CIRR/CIRCO test-server files go (default: log dir)


def _allow_in_checkpoints() -> None:
    """Let torch.load(weights_only=True) read checkpoints whose hyper-parameters hold these sections."""
    import torch

    torch.serialization.add_safe_globals([LoraConfig, BackboneConfig, OptimizerConfig, SchedulerConfig, EvalConfig])


_allow_in_checkpoints()
