"""CLIP4Cir, both stages: stage 1 fine-tunes CLIP with the summed query, stage 2 trains the Combiner.

Faithful to the reference (METHODS.md "Combiner"): fixed logit scale 100, one-way cross-entropy
query -> target, the target feature normalised, the backbone kept in eval mode, AdamW (stage 1) /
Adam (stage 2) with the reference settings, FashionIQ captions joined at random in training and
as "C1 and c2" in evaluation. Stage 2 reads frozen features from a cache filled once.

Precision as the reference: the stage-2 recipes train under 16-mixed (fp16 autocast + GradScaler,
the reference's combiner_train.py), and the cache is filled under the run's autocast, as the
reference encodes its training batches with an fp16 CLIP (one difference: autocast keeps the
residual stream in fp32, fp16 weights do not; docs/differences.md). Evaluation runs outside
autocast, in fp32, as the reference validates with `clip_model.float()`.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from cirlab.data.benchmarks.fashioniq import caption_variants, join_captions_train
from cirlab.data.evalset import Protocol
from cirlab.losses import info_nce
from cirlab.models import Combiner
from cirlab.train.composed import ComposedRetrievalTask
from cirlab.train.config import BackboneConfig, EvalConfig, OptimizerConfig, SchedulerConfig
from cirlab.train.feature_cache import FeatureCache, autocast_tag, transform_key

_TOWERS = ("both", "image", "text")


@dataclass
class CombinerConfig:
    """Combiner(D, P, H): CLIP4Cir uses P = 4D, H = 8D (RN50x4: 2560, 5120). None = those ratios."""

    projection_dim: Optional[int] = None
    hidden_dim: Optional[int] = None
    dropout: float = 0.5


def training_text(texts: list[str], text_format: str, rng: random.Random) -> str:
    """The text a training triplet uses this step: FashionIQ's random join, else a random caption."""
    if text_format == "fashioniq":
        return join_captions_train(texts[0], texts[1], rng)
    return texts[rng.randrange(len(texts))]


def text_variants(texts: list[str], text_format: str) -> list[str]:
    """Every text a triplet can train with (cached ahead in stage 2): FashionIQ's four joins."""
    if text_format == "fashioniq":
        return list(caption_variants(texts[0], texts[1]))
    return list(texts)


torch.serialization.add_safe_globals([CombinerConfig])  # readable with weights_only=True


class CombinerTask(ComposedRetrievalTask):
    """CLIP4Cir. `stage: 1` fine-tunes the towers named by `train_towers`; `stage: 2` trains a Combiner
    on the frozen backbone (point `backbone.pretrained` at the stage-1 export or a released
    {'CLIP': …} file)."""

    backbone_eval_mode = True  # the reference keeps CLIP in eval mode: frozen BatchNorm statistics

    def __init__(self, stage: int = 1, train_towers: str = "both", combiner: Optional[CombinerConfig] = None,
                 logit_scale: float = 100.0, cache_dir: Optional[str] = None,
                 backbone: Optional[BackboneConfig] = None, optimizer: Optional[OptimizerConfig] = None,
                 scheduler: Optional[SchedulerConfig] = None, evaluation: Optional[EvalConfig] = None,
                 seed: int = 0) -> None:
        if stage not in (1, 2):
            raise ValueError(f"CombinerTask stage must be 1 or 2, got {stage}")
        if train_towers not in _TOWERS:
            raise ValueError(f"train_towers must be one of {_TOWERS}, got {train_towers!r}")
        self.stage = stage
        self.train_towers = train_towers
        self.combiner_cfg = combiner or CombinerConfig()
        self.fixed_logit_scale = logit_scale
        self.cache_dir = cache_dir
        self.rng = random.Random(seed)
        super().__init__(backbone, optimizer, scheduler, evaluation)

    def default_backbone(self) -> BackboneConfig:
        return BackboneConfig(image_transform="targetpad")

    def default_optimizer(self) -> OptimizerConfig:
        if self.stage == 1:
            return OptimizerConfig(name="adamw", lr=2e-6, betas=[0.9, 0.999], eps=1e-7, weight_decay=0.01)
        return OptimizerConfig(name="adam", lr=2e-5, weight_decay=0.0)

    def configure_models(self) -> None:
        super().configure_models()
        if self.stage == 1:
            self.backbone.set_trainable(image=self.train_towers in ("both", "image"),
                                        text=self.train_towers in ("both", "text"))
            self.combiner = None
        else:
            self.backbone.set_trainable(image=False, text=False)
            d = self.backbone.embed_dim
            c = self.combiner_cfg
            self.combiner = Combiner(d, c.projection_dim or 4 * d, c.hidden_dim or 8 * d, dropout=c.dropout)
        self.backbone.model.logit_scale.requires_grad_(False)  # fixed scale 100, never learned
        self._image_cache: Optional[FeatureCache] = None
        self._text_cache: Optional[FeatureCache] = None

    def export_modules(self) -> dict[str, nn.Module]:
        return {"combiner": self.combiner} if self.combiner is not None else {}

    # the caption draw's own generator: a resumed run continues its sequence (exact resume)
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        version, internal, gauss = self.rng.getstate()
        checkpoint["cirlab_text_rng"] = {"version": version, "internal": list(internal), "gauss": gauss}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("cirlab_text_rng")
        if state is not None:
            self.rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))

    # ------------------------------------------------------------------ query
    def combine(self, ref: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """Normalised query from raw reference and text features (stage 1: sum; stage 2: Combiner)."""
        if self.stage == 1:
            return self.normalize(ref + txt)
        return self.combiner(ref, txt)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.backbone.encode_text(self.backbone.tokenize(texts).to(self.device))

    @contextmanager
    def full_precision(self) -> Iterator[None]:
        """Autocast off: the reference evaluates with an fp32 CLIP and Combiner."""
        with torch.autocast(self.device.type, enabled=False):
            yield

    def gallery_features(self, images: torch.Tensor) -> torch.Tensor:
        with self.full_precision():
            return super().gallery_features(images.float())

    def query_features(self, ref_features: torch.Tensor, texts: list[list[str]], protocol: Protocol) -> torch.Tensor:
        with self.full_precision():
            return self.combine(ref_features.float(), self.encode_texts(self.query_texts(texts, protocol)))

    def loss(self, query: torch.Tensor, target_raw: torch.Tensor) -> torch.Tensor:
        # logits = 100 * query . normalise(target); one-way cross-entropy, labels arange(B) (global)
        return info_nce(query, self.normalize(target_raw), self.fixed_logit_scale, symmetric=False, gather=True)

    # ------------------------------------------------------------------ data
    def configure_datamodule(self, dm: Any) -> None:
        if self.stage == 2 and hasattr(dm, "decode_images"):
            dm.decode_images = False  # stage 2 trains from cached features: skip the pixels

    def _cache_root(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        return Path(self.trainer.default_root_dir) / "feature_cache"

    def on_fit_start(self) -> None:
        if self.stage == 2:
            self.fill_feature_cache()

    @torch.no_grad()
    def fill_feature_cache(self) -> None:
        """Encode every training image and every text variant once (stage 2); later runs reuse them.
        Under DDP each rank encodes its share of the shards and saves it, then every rank reads all.
        The features are computed under the run's precision (16-mixed: fp16 autocast, as the
        reference's fp16 CLIP), and kept apart from those of other precisions."""
        with self.trainer.precision_plugin.forward_context():
            self._fill_feature_cache()

    def _fill_feature_cache(self) -> None:
        dm = self.trainer.datamodule
        fp = self.backbone.fingerprint()
        tf = self.image_transform(train=False)
        tag = autocast_tag(self.device.type)  # "" in full precision, "-float16" / "-bfloat16" under autocast
        image_space, text_space = f"image-{transform_key(tf)}{tag}", f"text{tag}"
        self._image_cache = FeatureCache(self._cache_root(), fp, image_space)
        self._text_cache = FeatureCache(self._cache_root(), fp, text_space)
        was_training = self.training
        self.eval()
        new_images = new_texts = 0
        pending: dict[str, torch.Tensor] = {}
        texts: list[str] = []
        from tqdm.auto import tqdm

        world = self.trainer.world_size
        samples = dm.triplet_samples(transform=tf, rank=self.trainer.global_rank, world_size=world)
        for sample in tqdm(samples, desc="feature cache", unit="triplet", disable=not self.trainer.is_global_zero,
                           mininterval=2.0):
            for key, field in (("ref_id", "ref"), ("tgt_id", "tgt")):
                img_id = sample[key]
                if img_id not in self._image_cache and img_id not in pending and field in sample:
                    pending[img_id] = sample[field]
            texts.extend(text_variants(sample["texts"], sample.get("text_format", "plain")))
            if len(pending) >= self.eval_cfg.batch_size:
                new_images += self._encode_pending(pending)
        new_images += self._encode_pending(pending)
        for s in range(0, len(texts), self.eval_cfg.batch_size):
            chunk = self._text_cache.missing(texts[s:s + self.eval_cfg.batch_size])
            if chunk:
                self._text_cache.add(chunk, self.encode_texts(chunk))
                new_texts += len(chunk)
        self._image_cache.save()  # each rank its own part files
        self._text_cache.save()
        if world > 1:  # then every rank reads every rank's parts
            self.trainer.strategy.barrier("feature-cache")
            self._image_cache = FeatureCache(self._cache_root(), fp, image_space)
            self._text_cache = FeatureCache(self._cache_root(), fp, text_space)
        self.train(was_training)
        self.print(f"feature cache: {len(self._image_cache)} images ({new_images} new), "
                   f"{len(self._text_cache)} texts ({new_texts} new) in {self._image_cache.dir.parent}")

    def _encode_pending(self, pending: dict[str, torch.Tensor]) -> int:
        if not pending:
            return 0
        ids = list(pending)
        feats = self.backbone.encode_image(torch.stack([pending[i] for i in ids]).to(self.device))
        self._image_cache.add(ids, feats)
        pending.clear()
        return len(ids)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        formats = batch.get("text_format") or ["plain"] * len(batch["texts"])
        texts = [training_text(t, f, self.rng) for t, f in zip(batch["texts"], formats)]
        if self.stage == 1:
            ref = self.backbone.encode_image(batch["ref"])
            tgt = self.backbone.encode_image(batch["tgt"])
            txt = self.encode_texts(texts)
        else:
            ref = self._image_cache.get(list(batch["ref_id"])).to(self.device)
            tgt = self._image_cache.get(list(batch["tgt_id"])).to(self.device)
            txt = self._text_cache.get(texts).to(self.device)
        loss = self.loss(self.combine(ref, txt), tgt)
        self.log("train/loss", loss, prog_bar=True, batch_size=ref.shape[0])
        return loss
