"""FocalLens (METHODS.md "FocalLens", FocalLens-CLIP is our design): an instruction-conditioned CLIP ViT.

Training step on instruction shards (image, instruction, answer): the conditional image embedding
(models/focallens.py) and the text embedding of the answer, both L2-normalised, go into a symmetric
InfoNCE with the model's logit scale; samples of the batch with the same answer are not negatives
(masked from the softmax in both directions); features are gathered across ranks. The text tower is
frozen by default (`backbone.freeze_text`); the vision tower trains fully or with LoRA
(`backbone.lora` with towers [image]); the projection, the cross-attention and the gates always train.
With `backbone.freeze_text: false` the text tower trains too, so the answers' text embeddings can move
apart (the synthetic world's tiny CLIP puts "circle", "square", "two", "three" at cosine 0.98-1.0).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from cirlab.losses import info_nce
from cirlab.models.focallens import FocalLens
from cirlab.train.conditional import ConditionalEmbeddingTask
from cirlab.train.config import BackboneConfig, EvalConfig, OptimizerConfig, SchedulerConfig
from cirlab.train.optim import build_optimizer, lr_lambda


class FocalLensTask(ConditionalEmbeddingTask):
    """FocalLens-CLIP: contrastive instruction tuning of the vision tower (see the module docstring).

    `init_logit_scale`: None keeps the backbone's own (1/0.07 at random init, 100 for released CLIP
    weights); `learnable_temperature` trains it (clamped at 100, as CLIP). `adapter_lr_scale`
    multiplies the learning rate of the instruction projection and the gates (ours): a gate that
    starts at exactly zero opens by about one learning rate per Adam step, so at a fine-tuning rate
    it stays nearly shut for hundreds of steps (and the projection, whose gradient goes through it, learns nothing).
    `conditioning` (models/focallens.py): "xattn" (default) lets every image token attend to the instruction
    tokens before the first block and after each block; "mean" adds the mean instruction token to every image token (the first design).
    """

    # the conditioned path calls the ViT's blocks piece by piece (models/focallens.py, _split_block)
    piecewise_modules = ("backbone.model.visual",)

    def __init__(self, learnable_temperature: bool = True, init_logit_scale: Optional[float] = None,
                 adapter_lr_scale: float = 1.0, conditioning: str = "xattn", eval_sets: Optional[list[str]] = None,
                 eval_every_n_epochs: int = 1,
                 backbone: Optional[BackboneConfig] = None, optimizer: Optional[OptimizerConfig] = None,
                 scheduler: Optional[SchedulerConfig] = None, evaluation: Optional[EvalConfig] = None) -> None:
        if init_logit_scale is not None and init_logit_scale <= 0:
            raise ValueError(f"init_logit_scale must be > 0, got {init_logit_scale}")
        if adapter_lr_scale <= 0:
            raise ValueError(f"adapter_lr_scale must be > 0, got {adapter_lr_scale}")
        self.learnable_temperature = learnable_temperature
        self.conditioning = conditioning
        self.adapter_lr_scale = adapter_lr_scale
        self.init_logit_scale = init_logit_scale
        super().__init__(eval_sets, eval_every_n_epochs, backbone, optimizer, scheduler, evaluation)

    def default_backbone(self) -> BackboneConfig:
        return BackboneConfig(freeze_text=True)

    def default_optimizer(self) -> OptimizerConfig:
        # ours (no public reference): CLIP fine-tuning settings
        return OptimizerConfig(name="adamw", lr=1e-5, betas=[0.9, 0.98], eps=1e-6, weight_decay=0.1,
                               no_decay_on_bias_and_norm=True)

    def default_scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(name="cosine", warmup_steps=100)

    def configure_models(self) -> None:
        super().configure_models()
        self.focallens = FocalLens.for_backbone(self.backbone, self.conditioning)
        scale = self.backbone.model.logit_scale
        if self.init_logit_scale is not None:
            with torch.no_grad():
                scale.fill_(math.log(self.init_logit_scale))
        scale.requires_grad_(self.learnable_temperature)

    def configure_optimizers(self) -> Any:
        if self.adapter_lr_scale == 1.0:
            return super().configure_optimizers()
        opt = build_optimizer(self.named_parameters(), self.optimizer_cfg, getattr(self, "_param_ndims", None))
        adapter = {id(p) for p in self.focallens.parameters()}
        # the adapter's parameters in groups of their own at the scaled rate (same decay split); the
        # schedule's multiplier then applies to each group's own base rate
        for group in list(opt.param_groups):
            mine = [p for p in group["params"] if id(p) in adapter]
            group["params"] = [p for p in group["params"] if id(p) not in adapter]
            for decays in (True, False):  # the gates never decay: decay would pull them shut
                part = [p for p in mine if (p is not self.focallens.gate) == decays]
                if part:
                    opt.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": part,
                                         "lr": group["lr"] * self.adapter_lr_scale,
                                         "weight_decay": group["weight_decay"] if decays else 0.0})
        opt.param_groups[:] = [g for g in opt.param_groups if g["params"]]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.scheduler_cfg, self.schedule_length()))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def logit_scale(self) -> torch.Tensor:
        return self.backbone.model.logit_scale.exp().clamp(max=100)

    def export_modules(self) -> dict[str, nn.Module]:
        return {"focallens": self.focallens}

    # ----------------------------------------------------------------- encoders
    def encode_instruction(self, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.focallens.encode_instructions(self.backbone, [instruction], self.device)

    def conditional_features(self, images: torch.Tensor, instruction: Any) -> torch.Tensor:
        instr, lengths = instruction
        return self.focallens.encode_images(self.backbone, images, instr, lengths)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Raw answer features; each distinct text encoded once (a batch repeats the few answers)."""
        distinct = list(dict.fromkeys(texts))
        tokens = self.backbone.tokenize(distinct).to(self.device)
        text_trains = any(p.requires_grad for p in self.backbone.text_parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and text_trains):
            feats = self.backbone.encode_text(tokens)
        if len(distinct) == len(texts):
            return feats
        pos = {t: i for i, t in enumerate(distinct)}
        return feats[torch.tensor([pos[t] for t in texts], device=feats.device)]

    def loss(self, images: torch.Tensor, instructions: list[str], answers: list[str]) -> torch.Tensor:
        """Symmetric InfoNCE of conditional image vs answer embeddings; equal answers are not negatives."""
        cond = self.normalize(self.focallens(self.backbone, images, instructions))
        ans = self.normalize(self.text_features(list(answers)))
        return info_nce(cond, ans.to(cond.dtype), self.logit_scale(), symmetric=True, gather=True,
                        duplicate_ids=[str(a).strip().lower() for a in answers])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch["image"], list(batch["instruction"]), list(batch["answer"]))
        n = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/logit_scale", self.logit_scale().detach(), batch_size=n)
        self.log("train/gate_abs_mean", self.focallens.gate.detach().abs().mean(), batch_size=n)
        return loss
