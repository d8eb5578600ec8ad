"""LinCIR: phi trained from text alone by self-masking projection (METHODS.md "LinCIR").

Training step: z = text features of the cleaned caption (`clean_caption`: `<PERSON>` -> person,
lower-case, real `$` removed, cut to 75 tokens, as the reference; frozen tower, unnormalised, cacheable);
x = z + s*eps with s ~ U(0,1) per sample and eps ~ N(0, I); p = phi(x); z_hat = text features
of the keyword-masked caption with p at EVERY `$`; loss = MSE(z_hat, z). Gradients flow through
the frozen text tower into phi. The image tower is neither loaded nor run in training; evaluation
(zero-shot: "a photo of $ that {text}" with phi(image feature) at `$`) loads it. FashionIQ's two
captions are each stripped of ". ? ," at both ends, joined in both orders, and the two normalised
features averaged (the reference's validate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import logging
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.data.benchmarks.fashioniq import clean_caption as strip_fashioniq_caption
from cirlab.data.evalset import Protocol
from cirlab.data.masking import MaskMissingCaptions
from cirlab.errors import CirlabError
from cirlab.models import DOLLAR_TOKEN_ID, Phi
from cirlab.train.composed import ComposedRetrievalTask
from cirlab.train.config import BackboneConfig, EvalConfig, OptimizerConfig, SchedulerConfig
from cirlab.train.feature_cache import FeatureCache, autocast_tag


@dataclass
class MaskingConfig:
    """Keyword masking applied on the fly to captions whose shard has no `masked` field."""

    tagger: str = "auto"  # auto | spacy | lexicon
    lexicon: Optional[str] = None  # "synthetic" = the synthetic world's vocabulary
    reference_quirk: bool = False


torch.serialization.add_safe_globals([MaskingConfig])  # readable with weights_only=True

log = logging.getLogger(__name__)

#: what a `$` inside a query text becomes at evaluation (the prompt's own `$` always takes phi's token)
DOLLAR_IN_TEXT = ("literal", "pseudo")


class LinCIRTask(ComposedRetrievalTask):
    """LinCIR's self-masking projection. Training never builds the image tower unless `image_tower: true`;
    evaluation loads it (frozen, from backbone.pretrained) when it needs to rank images."""

    def __init__(self, image_tower: bool = False, phi_hidden_dim: Optional[int] = None, phi_dropout: float = 0.5,
                 noise: bool = True, cache_text_features: bool = True, cache_dir: Optional[str] = None,
                 prompt: str = "a photo of $ that {}", dollar_in_text: str = "literal",
                 masking: Optional[MaskingConfig] = None,
                 backbone: Optional[BackboneConfig] = None, optimizer: Optional[OptimizerConfig] = None,
                 scheduler: Optional[SchedulerConfig] = None, evaluation: Optional[EvalConfig] = None,
                 seed: int = 0) -> None:
        if "$" not in prompt or "{}" not in prompt:
            raise ValueError(f"LinCIR prompt {prompt!r} needs a ' $ ' placeholder and a '{{}}' for the text")
        if prompt.count("$") != 1 or prompt.index("$") > prompt.index("{}"):
            # the prompt's `$` must be the first one of every query, so a `$` in the text is told apart
            raise CirlabError(f"LinCIR prompt {prompt!r} must hold exactly one '$', before the '{{}}'",
                              "e.g. 'a photo of $ that {}'")
        if dollar_in_text not in DOLLAR_IN_TEXT:
            raise CirlabError(f"LinCIR dollar_in_text={dollar_in_text!r} is not one of {DOLLAR_IN_TEXT}",
                              "'literal' keeps a '$' in a query text the dollar sign; "
                              "'pseudo' gives it phi's token too, as the reference")
        self.dollar_in_text = dollar_in_text
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
        """z: the frozen tower's raw features of the (cleaned) captions (cached by caption when enabled)."""
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
        """The self-masking projection loss for a batch of cleaned captions and their masked forms."""
        z = self.caption_features(captions)
        p = self.phi(self.add_noise(z))
        tokens = self.backbone.tokenize(masked).to(self.device)
        z_hat = self.backbone.encode_text_with_pseudo_tokens(tokens, p, DOLLAR_TOKEN_ID, first_only=False)
        return F.mse_loss(z_hat.float(), z.float())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        captions = list(batch["text"])
        masked, cleaned = batch.get("masked"), batch.get("cleaned")
        if masked is None or cleaned is None or None in masked or None in cleaned:
            # a data module without the worker hook: clean (and mask) here
            samples = [{"text": c, "masked": None if masked is None else masked[i]} for i, c in enumerate(captions)]
            samples = self.mask_missing()(samples)
            masked, cleaned = [s["masked"] for s in samples], [s["cleaned"] for s in samples]
        # z from the cleaned caption, the text the mask was made from (the reference's clean_caption)
        loss = self.smp_loss(list(cleaned), list(masked))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(captions))
        return loss

    # ------------------------------------------------------------------ zero-shot query
    def query_prompts(self, texts: list[list[str]], protocol: Protocol) -> list[list[str]]:
        """The prompt strings of each query: one, or for FashionIQ's caption pair both orders, each
        caption stripped of ". ? ," at its ends (the reference's ``strip('.?, ')``)."""
        if protocol.text_format == "fashioniq":
            pairs = [(strip_fashioniq_caption(t[0]), strip_fashioniq_caption(t[1])) for t in texts]
            return [[self.prompt.format(f"{a} and {b}"), self.prompt.format(f"{b} and {a}")] for a, b in pairs]
        return [[self.prompt.format(t[0])] for t in texts]

    def prompt_features(self, pseudo: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Raw features of filled-in prompts with phi's token at the prompt's `$` (and, with
        dollar_in_text='pseudo', at every `$` of the text too, as the reference)."""
        tokens = self.backbone.tokenize(prompts).to(self.device)
        stray = ((tokens == DOLLAR_TOKEN_ID).sum(dim=1) > 1).nonzero().flatten().tolist()
        if stray and not getattr(self, "_warned_stray_dollar", False):
            self._warned_stray_dollar = True  # once per task: a benchmark can hold many
            rule = ("keeps it the dollar sign (dollar_in_text='literal')" if self.dollar_in_text == "literal"
                    else "gives it phi's token too (dollar_in_text='pseudo', the reference)")
            log.warning("LinCIR: a query text holds a '$' token (%r); the evaluation %s", prompts[stray[0]], rule)
        first_only = self.dollar_in_text == "literal"
        return self.backbone.encode_text_with_pseudo_tokens(tokens, pseudo, DOLLAR_TOKEN_ID, first_only=first_only)

    def query_features(self, ref_features: torch.Tensor, texts: list[list[str]], protocol: Protocol) -> torch.Tensor:
        pseudo = self.phi(ref_features.to(self.phi.layers[0].weight.dtype))
        prompts = self.query_prompts(texts, protocol)
        if protocol.text_format == "fashioniq":
            # both caption orders, normalised features averaged
            a = self.normalize(self.prompt_features(pseudo, [p[0] for p in prompts]))
            b = self.normalize(self.prompt_features(pseudo, [p[1] for p in prompts]))
            return self.normalize(a + b)
        return self.prompt_features(pseudo, [p[0] for p in prompts])
