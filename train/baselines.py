"""Zero-training baselines every composed-retrieval paper reports: image-only, text-only, summed."""

from __future__ import annotations

from typing import Any, Optional

import torch

from cirlab.data.evalset import Protocol
from cirlab.train.composed import ComposedRetrievalTask
from cirlab.train.config import BackboneConfig, EvalConfig

MODES = ("image", "text", "sum")


class BaselineTask(ComposedRetrievalTask):
    """Query = the reference image's feature, the text's feature, or their normalised sum. No training."""

    def __init__(self, mode: str = "sum", backbone: Optional[BackboneConfig] = None,
                 evaluation: Optional[EvalConfig] = None) -> None:
        if mode not in MODES:
            raise ValueError(f"baseline mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        super().__init__(backbone, None, None, evaluation)

    def configure_models(self) -> None:
        super().configure_models()
        self.backbone.requires_grad_(False)  # nothing trains: its gallery is frozen (kept, shareable)

    def query_features(self, ref_features: torch.Tensor, texts: list[list[str]], protocol: Protocol) -> torch.Tensor:
        if self.mode == "image":
            return ref_features
        tok = self.backbone.tokenize(self.query_texts(texts, protocol)).to(self.device)
        txt = self.backbone.encode_text(tok)
        if self.mode == "text":
            return txt
        return self.normalize(self.normalize(ref_features) + self.normalize(txt))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        raise RuntimeError("BaselineTask has nothing to train: use `cirlab test` or `cirlab evaluate`")

    @classmethod
    def on_backbone_of(cls, task: Any, mode: str = "sum") -> "BaselineTask":
        """The baseline on another task's backbone as it stands (a CLIP run's, a fine-tuned one's):
        its weights, LoRA, image transform and left-out image tower, nothing else of the task."""
        import dataclasses

        from cirlab.models.loading import quiet_random_init

        cfg = getattr(task, "backbone_cfg", None)
        if cfg is None or not isinstance(getattr(task, "backbone", None), torch.nn.Module):
            raise ValueError(f"{type(task).__name__} has no cirlab backbone to score as a baseline")
        with quiet_random_init():  # a placeholder tower, replaced at once by the task's own
            baseline = cls(mode, backbone=dataclasses.replace(cfg, pretrained=None, lora=None),
                           evaluation=getattr(task, "eval_cfg", None))
        baseline.backbone = task.backbone
        baseline.backbone.requires_grad_(False)
        baseline.backbone_cfg = cfg  # ensure_image_tower rebuilds a left-out image tower from its source
        if getattr(task, "_embedded_image_tower", None) is not None:
            baseline._embedded_image_tower = task._embedded_image_tower
        return baseline.eval()
