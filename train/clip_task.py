"""CLIP contrastive fine-tuning on image-text pairs: the quickstart backbone and a user's own pairs."""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch

from cirlab.losses import info_nce
from cirlab.models.backbone import STAR_TOKEN_ID
from cirlab.train.base import BaseTask
from cirlab.train.config import BackboneConfig, EvalConfig, OptimizerConfig, SchedulerConfig

log = logging.getLogger(__name__)


class CLIPTask(BaseTask):
    """Symmetric InfoNCE between image and caption features, gathered across ranks (CLIP).

    The temperature is the model's own learnable logit scale (clamped at 100 as in CLIP), or fixed
    at `init_logit_scale` when `learnable_temperature` is false. Identical captions in a batch are
    not each other's negatives (a labelled set such as the world's objects/ repeats its captions).
    Validation on held-out pairs reports image->text and text->image Recall@1/5 (texts deduplicated:
    identical captions are one entry).

    `hard_negatives` K > 0 (NegCLIP, Yuksekgonul et al. 2023): the first K captions of each pair's
    json field `negatives` (false of its image, e.g. one object's shape swapped) join every image's
    image->text softmax, so the image feature must tell the words that differ. Pairs with fewer are
    padded and the padding masked; pairs without the field train as plain CLIP.

    `dense_references` p > 0: a fraction p of the pairs that carry a `reference` and a `dense_text`
    (the world's difference captions: "a photo of * , make the circle red" with the reference's
    words kept apart) train on `dense_text` with the reference given as one dense token at `*`: a
    learnt linear map of the reference's own text feature (no gradient through that feature).
    `dense_inversions` q > 0: a fraction q of the other pairs train as "a photo of *" with their
    caption's dense token. A web-scale text tower composes a pseudo-word with an edit (what Pic2Word,
    SEARLE and LinCIR rely on); a tiny one learns it only from such captions (docs/zero-shot-synthetic.md,
    attempt 7). The map is pre-training's alone and not exported.
    """

    def __init__(self, backbone: Optional[BackboneConfig] = None, optimizer: Optional[OptimizerConfig] = None,
                 scheduler: Optional[SchedulerConfig] = None, evaluation: Optional[EvalConfig] = None,
                 learnable_temperature: bool = True, init_logit_scale: float = 1 / 0.07,
                 hard_negatives: int = 0, dense_references: float = 0.0, dense_inversions: float = 0.0) -> None:
        if hard_negatives < 0:
            raise ValueError(f"CLIPTask hard_negatives must be >= 0 (captions per pair), got {hard_negatives}")
        for name, p in (("dense_references", dense_references), ("dense_inversions", dense_inversions)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"CLIPTask {name} is a fraction of the pairs, in [0, 1]; got {p}")
        self.dense_references, self.dense_inversions = float(dense_references), float(dense_inversions)
        self._warned_no_references = False
        self._seen_references = False
        self.hard_negatives = hard_negatives
        self.learnable_temperature = learnable_temperature
        self.init_logit_scale = init_logit_scale
        super().__init__(backbone, optimizer, scheduler, evaluation)

    def default_optimizer(self) -> OptimizerConfig:
        return OptimizerConfig(name="adamw", lr=5e-4, betas=[0.9, 0.98], eps=1e-6, weight_decay=0.1,
                               no_decay_on_bias_and_norm=True)

    def default_scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(name="cosine", warmup_steps=50)

    def configure_models(self) -> None:
        super().configure_models()
        scale = self.backbone.model.logit_scale
        with torch.no_grad():
            scale.fill_(math.log(self.init_logit_scale))
        scale.requires_grad_(self.learnable_temperature)
        if self.dense_references > 0 or self.dense_inversions > 0:
            # text feature of the reference -> one input token: the tower learns to unpack it
            self.reference_token = torch.nn.Linear(self.backbone.embed_dim, self.backbone.token_dim)

    def logit_scale(self) -> torch.Tensor:
        return self.backbone.model.logit_scale.exp().clamp(max=100)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        texts = list(batch["text"])
        img = self.normalize(self.backbone.encode_image(batch["image"]))
        txt, ids = self._text_features(batch, texts)
        negs, mask = self._hard_negatives(batch, img.shape[0])
        loss = info_nce(img, txt, self.logit_scale(), symmetric=True, gather=True,
                        duplicate_ids=ids, hard_negatives=negs, hard_negative_mask=mask)
        self.log("train/loss", loss, prog_bar=True, batch_size=img.shape[0])
        self.log("train/logit_scale", self.logit_scale().detach(), batch_size=img.shape[0])
        return loss

    def _text_features(self, batch: dict[str, Any], texts: list[str]) -> tuple[torch.Tensor, list[str]]:
        """Normalised caption features (B, D), some with a dense reference token; ids for duplicates."""
        dense = self._dense_choice(batch, len(texts))
        if not dense:
            txt = self.normalize(self.backbone.encode_text(self.backbone.tokenize(texts).to(self.device)))
            if hasattr(self, "reference_token"):
                # unused this step: a zero term keeps DDP from failing on a parameter without gradient
                txt = txt + 0.0 * sum(p.sum() for p in self.reference_token.parameters())
            return txt, texts
        rows = sorted(dense)
        with torch.no_grad():  # the reference's feature is a target to unpack, not trained through here
            ref = self.backbone.encode_text(self.backbone.tokenize([dense[i][1] for i in rows]).to(self.device))
        pseudo = self.reference_token(ref.to(self.reference_token.weight.dtype))
        dense_tok = self.backbone.tokenize([dense[i][0] for i in rows]).to(self.device)
        feats = self.backbone.encode_text_with_pseudo_tokens(dense_tok, pseudo, placeholder_id=STAR_TOKEN_ID)
        plain = [i for i in range(len(texts)) if i not in dense]
        out = torch.empty(len(texts), feats.shape[1], device=self.device, dtype=feats.dtype)
        out[torch.tensor(rows, device=self.device)] = feats
        if plain:
            tok = self.backbone.tokenize([texts[i] for i in plain]).to(self.device)
            out[torch.tensor(plain, device=self.device)] = self.backbone.encode_text(tok).to(feats.dtype)
        # a dense caption equals its written form only if the reference does: both strings in its id
        ids = [f"{dense[i][0]}\x00{dense[i][1]}" if i in dense else t for i, t in enumerate(texts)]
        return self.normalize(out), ids

    def _dense_choice(self, batch: dict[str, Any], b: int) -> dict[int, tuple[str, str]]:
        """row -> (text with `*`, reference text) for the rows trained with a dense reference token."""
        if not (self.dense_references > 0 or self.dense_inversions > 0):
            return {}
        refs = batch.get("reference") or [None] * b
        dense_texts = batch.get("dense_text") or [None] * b
        if any(r is not None and d is not None for r, d in zip(refs, dense_texts)):
            self._seen_references = True  # one batch without any is normal: shards may hold one kind each
        draws = torch.rand(b).tolist()  # the global generator: seed_everything makes it repeatable
        out = {}
        for i, (ref, dense, u) in enumerate(zip(refs, dense_texts, draws)):
            if ref is not None and dense is not None:
                if u < self.dense_references:
                    out[i] = (dense, ref)
            elif u < self.dense_inversions:
                out[i] = ("a photo of *", batch["text"][i])
        return out

    def on_train_epoch_end(self) -> None:
        # warned after a whole epoch, not a batch: the world's shards hold plain or difference pairs
        if self.dense_references > 0 and not self._seen_references and not self._warned_no_references:
            self._warned_no_references = True
            log.warning("CLIPTask dense_references=%s, but no pair of this epoch carried a json `reference` "
                        "and `dense_text`: none trained with a dense reference token (build them as "
                        "data/synthetic.py's difference pairs do, or set dense_references: 0)",
                        self.dense_references)

    def _hard_negatives(self, batch: dict[str, Any], b: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(B*K, D) features of the pairs' negative captions, padded to K each, and the mask of real ones."""
        k = self.hard_negatives
        if k == 0:
            return None, None
        texts, real = [], []
        for negs in batch.get("negatives") or [None] * b:
            negs = list(negs or [])[:k]
            texts += negs + [""] * (k - len(negs))
            real += [True] * len(negs) + [False] * (k - len(negs))
        world = self.trainer.world_size if self._trainer is not None else 1
        if not any(real) and world == 1:
            return None, None  # nothing to add (with several ranks each must still join the gather)
        feats = self.normalize(self.backbone.encode_text(self.backbone.tokenize(texts).to(self.device)))
        return feats, torch.tensor(real, device=self.device)

    # validation on held-out pairs
    def on_validation_epoch_start(self) -> None:
        self._val_img: list[torch.Tensor] = []
        self._val_txt: list[str] = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._val_img.append(self.normalize(self.backbone.encode_image(batch["image"])).float().cpu())
        self._val_txt.extend(batch["text"])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self._val_img:
            return
        img, texts = torch.cat(self._val_img), self._val_txt
        if self.trainer.world_size > 1:
            # each rank validated its share of the pairs: rank against the whole held-out set
            import torch.distributed as dist

            parts: list = [None] * self.trainer.world_size
            dist.all_gather_object(parts, (img, texts))
            img = torch.cat([p[0] for p in parts])
            texts = [t for p in parts for t in p[1]]
        metrics = self.pair_retrieval_metrics(img, texts)
        self.last_results = {"pairs": metrics}
        self.log_dict({f"val/{k}": v for k, v in metrics.items()})

    @torch.no_grad()
    def pair_retrieval_metrics(self, img: torch.Tensor, texts: list[str]) -> dict[str, float]:
        """Image->text and text->image Recall@1/5 in percent, identical captions merged into one text."""
        uniq = list(dict.fromkeys(texts))
        pos = {t: i for i, t in enumerate(uniq)}
        feats = []
        for s in range(0, len(uniq), 256):
            tok = self.backbone.tokenize(uniq[s:s + 256]).to(self.device)
            feats.append(self.normalize(self.backbone.encode_text(tok)).float().cpu())
        txt = torch.cat(feats)
        target = torch.tensor([pos[t] for t in texts])
        sims = img @ txt.T  # (N images, U texts): validation sets are small
        out = {}
        for k in (1, 5):
            topk = sims.topk(min(k, sims.shape[1]), dim=1).indices
            out[f"i2t_R@{k}"] = 100.0 * (topk == target[:, None]).any(1).float().mean().item()
        # text->image: a text's positives are all images carrying it
        t2i = sims.T.topk(min(5, sims.shape[0]), dim=1).indices
        for k in (1, 5):
            hit = (target[t2i[:, :k]] == torch.arange(len(uniq))[:, None]).any(1)
            out[f"t2i_R@{k}"] = 100.0 * hit.float().mean().item()
        out["chance_i2t_R@1"] = 100.0 / len(uniq)
        return out
