"""LinCIR: phi trained from text alone by self-masking projection (METHODS.md "LinCIR").

Training step: z = text features of the caption (frozen tower, unnormalised, cacheable);
x = z + s*eps with s ~ U(0,1) per sample and eps ~ N(0, I); p = phi(x); z_hat = text features
of the keyword-masked caption with p at EVERY `$`; loss = MSE(z_hat, z). Gradients flow through
the frozen text tower into phi. The image tower is neither loaded nor run in training; evaluation
(zero-shot: "a photo of $ that {text}" with phi(image feature) at `$`) loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.data.evalset import Protocol
from cirlab.data.masking import MaskMissingCaptions
from cirlab.models import DOLLAR_TOKEN_ID, Phi
from cirlab.train.base import BaseTask
from cirlab.train.config import BackboneConfig, EvalConfig, OptimizerConfig, SchedulerConfig
from cirlab.train.feature_cache import FeatureCache, autocast_tag


@dataclass
class MaskingConfig:
    """Keyword masking applied on the fly to captions whose shard has no `masked` field."""

    tagger: str = "auto"  # auto | spacy | lexicon
    lexicon: Optional[str] = None  # "synthetic" = the synthetic world's vocabulary
    reference_quirk: bool = False


torch.serialization.add_safe_globals([MaskingConfig])  # readable with weights_only=True


class LinCIRTask(BaseTask):
    """LinCIR's self-masking projection. `image_tower: true` loads the image tower (for evaluation)."""

    evaluation_overrides: ClassVar[dict[str, Any]] = {"image_tower": True}

    def __init__(self, image_tower: bool = False, phi_hidden_dim: Optional[int] = None, phi_dropout: float = 0.5,
                 noise: bool = True, cache_text_features: bool = True, cache_dir: Optional[str] = None,
                 prompt: str = "a photo of $ that {}", masking: Optional[MaskingConfig] = None,
                 backbone: Optional[BackboneConfig] = None, optimizer: Optional[OptimizerConfig] = None,
                 scheduler: Optional[SchedulerConfig] = None, evaluation: Optional[EvalConfig] = None,
                 seed: int = 0) -> None:
        if "$" not in prompt or "{}" not in prompt:
            raise ValueError(f"LinCIR prompt {prompt!r} needs a ' $ ' placeholder and a '{{}}' for the text")
        self.needs_image_tower = image_tower
        self.phi_hidden_dim = phi_hidden_dim
        self.phi_dropout = phi_dropout
        self.noise = noise
        self.cache_text_features = cache_text_features
        self.cache_dir = cache_dir
        self.prompt = prompt
        self.masking = masking or MaskingConfig()
        self.seed = seed
        super().__init__(backbone, optimizer, scheduler, evaluation)

    def default_optimizer(self) -> OptimizerConfig:
        return OptimizerConfig(name="adamw", lr=1e-4, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.01)

    def configure_models(self) -> None:
        super().configure_models()
        self.backbone.set_trainable(image=False, text=False)
        self.backbone.model.logit_scale.requires_grad_(False)
        d, t = self.backbone.embed_dim, self.backbone.token_dim
        self.phi = Phi(d, self.phi_hidden_dim or 4 * d, t, dropout=self.phi_dropout)
        self._masker = None
        self._text_cache: Optional[FeatureCache] = None

    def export_modules(self) -> dict[str, nn.Module]:
        return {"phi": self.phi}

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen towers: no dropout, fixed statistics
        return self

    # ------------------------------------------------------------------ masking and caching
    def mask_missing(self) -> MaskMissingCaptions:
        """Masking for captions whose shards carry no `masked` field (`cirlab data mask` not run)."""
        if self._masker is None:
            self._masker = MaskMissingCaptions(self.masking.tagger, self.masking.lexicon,
                                               self.masking.reference_quirk, self.seed)
        return self._masker

    def configure_datamodule(self, dm: Any) -> None:
        if hasattr(dm, "set_train_prepare"):
            dm.set_train_prepare(self.mask_missing())  # in the loader workers, off the training loop

    def caption_features(self, captions: list[str]) -> torch.Tensor:
        """z: the frozen tower's raw features of the original captions (cached by caption when enabled)."""
        if not self.cache_text_features:
            with torch.no_grad():
                return self.backbone.encode_text(self.backbone.tokenize(captions).to(self.device))
        if self._text_cache is None:
            root = Path(self.cache_dir) if self.cache_dir else Path(
                getattr(self.trainer, "default_root_dir", ".") if self._trainer is not None else ".") / "feature_cache"
            # the features are computed here, inside the training step: under autocast when mixed
            self._text_cache = FeatureCache(root, self.backbone.fingerprint(), "text" + autocast_tag(self.device.type))
        todo = self._text_cache.missing(captions)
        if todo:
            with torch.no_grad():
                self._text_cache.add(todo, self.backbone.encode_text(self.backbone.tokenize(todo).to(self.device)))
        return self._text_cache.get(captions).to(self.device)

    def on_train_epoch_end(self) -> None:
        if self._text_cache is not None:  # every rank: each writes the captions it encoded, to its own part
            self._text_cache.save()

    # ------------------------------------------------------------------ training
    def add_noise(self, z: torch.Tensor) -> torch.Tensor:
        """x = z + s*eps, s ~ U(0,1) per sample, eps ~ N(0, I): phi learns to map noisy features."""
        if not self.noise:
            return z
        s = torch.rand(z.shape[0], 1, device=z.device, dtype=z.dtype)
        return z + s * torch.randn_like(z)

    def smp_loss(self, captions: list[str], masked: list[str]) -> torch.Tensor:
        """The self-masking projection loss for a batch of captions and their masked forms."""
        z = self.caption_features(captions)
        p = self.phi(self.add_noise(z))
        tokens = self.backbone.tokenize(masked).to(self.device)
        z_hat = self.backbone.encode_text_with_pseudo_tokens(tokens, p, DOLLAR_TOKEN_ID, first_only=False)
        return F.mse_loss(z_hat.float(), z.float())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        captions = list(batch["text"])
        masked = batch.get("masked")
        if masked is None or any(m is None for m in masked):  # a data module without the worker hook
            samples = self.mask_missing()([{"text": c} for c in captions])
            masked = [s["masked"] for s in samples]
        captions = [c.lower() for c in captions]
        loss = self.smp_loss(captions, list(masked))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(captions))
        return loss

    # ------------------------------------------------------------------ zero-shot query
    def prompt_features(self, pseudo: torch.Tensor, texts: list[str]) -> torch.Tensor:
        tokens = self.backbone.tokenize([self.prompt.format(t) for t in texts]).to(self.device)
        return self.backbone.encode_text_with_pseudo_tokens(tokens, pseudo, DOLLAR_TOKEN_ID, first_only=True)

    def query_features(self, ref_features: torch.Tensor, texts: list[list[str]], protocol: Protocol) -> torch.Tensor:
        pseudo = self.phi(ref_features.to(self.phi.layers[0].weight.dtype))
        if protocol.text_format == "fashioniq":
            # both caption orders, normalised features averaged
            a = self.normalize(self.prompt_features(pseudo, [f"{t[0]} and {t[1]}" for t in texts]))
            b = self.normalize(self.prompt_features(pseudo, [f"{t[1]} and {t[0]}" for t in texts]))
            return self.normalize(a + b)
        return self.prompt_features(pseudo, [t[0] for t in texts])
