"""Supervised pre-training of the image tower on labelled images: the part ImageNet plays for real towers.

A CLIP trained from scratch on captions learns first what tells a batch's captions apart most
cheaply; on the synthetic world that is colour and place, and shape never pays (a linear shape
probe of the demo CLIP reads 35-37 %, chance 25). A few hundred labelled steps on one-object
pictures teach the image tower shape, and clip.yaml then starts from those weights
(docs/zero-shot-synthetic.md, attempt 4). Open_clip's own towers start from labelled pre-training the
same way (LiT, ImageNet-initialised ViTs).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.errors import CirlabError
from cirlab.train.base import BaseTask
from cirlab.train.config import BackboneConfig, EvalConfig, OptimizerConfig, SchedulerConfig


class ImageClassificationTask(BaseTask):
    """Cross-entropy of a linear head on the image embedding, over the names in `classes`.

    Each training sample's json field `label_field` names its class. Only the image tower (and the
    head) train; the text tower and logit scale are frozen, so the export is the same CLIP with a
    new image tower. `val`: image/pair shards of the same labels, accuracy in val/acc.
    """

    def __init__(self, classes: list[str], label_field: str = "label", backbone: Optional[BackboneConfig] = None,
                 optimizer: Optional[OptimizerConfig] = None, scheduler: Optional[SchedulerConfig] = None,
                 evaluation: Optional[EvalConfig] = None) -> None:
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise CirlabError(f"ImageClassificationTask classes must be 2 or more distinct names, got {classes}",
                              "list each class once under model.init_args.classes")
        self.classes = list(classes)
        self._index = {c: i for i, c in enumerate(self.classes)}
        self.label_field = label_field
        super().__init__(backbone, optimizer, scheduler, evaluation)

    def default_optimizer(self) -> OptimizerConfig:
        return OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.01)

    def default_scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(name="constant")

    def configure_models(self) -> None:
        super().configure_models()
        model = self.backbone.model
        model.requires_grad_(False)
        model.visual.requires_grad_(True)
        self.head = nn.Linear(self.backbone.embed_dim, len(self.classes))

    def export_modules(self) -> dict[str, nn.Module]:
        return {"head": self.head}

    def _labels(self, batch: dict[str, Any]) -> torch.Tensor:
        names, index = batch.get(self.label_field), self._index
        if names is None or any(n not in index for n in names):
            bad = "no such field" if names is None else sorted({str(n) for n in names if n not in index})[:5]
            raise CirlabError(f"ImageClassificationTask: samples' {self.label_field!r} must name one of "
                              f"{self.classes} ({bad})", "set model.init_args.label_field / classes to match the shards")
        return torch.tensor([index[n] for n in names], device=self.device)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.encode_image(images))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        labels = self._labels(batch)
        logits = self.logits(batch["image"])
        loss = F.cross_entropy(logits, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=labels.shape[0])
        self.log("train/acc", (logits.argmax(1) == labels).float().mean(), batch_size=labels.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        labels = self._labels(batch)
        acc = (self.logits(batch["image"]).argmax(1) == labels).float().mean()
        self.log("val/acc", 100.0 * acc, batch_size=labels.shape[0], sync_dist=True)
