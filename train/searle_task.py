"""SEARLE: phi distilled from OTI tokens, and SEARLE-OTI (METHODS.md "SEARLE").

Training (on image shards; the frozen image tower's features are computed once and cached):
loss = NT-Xent(tau 0.25) between the normalised OTI tokens and phi(image feature) over the 2N
vectors (only self excluded) + 0.75 x the phrase regulariser: 1 - cos(text(phrase),
text(phrase with EVERY occurrence of its concept -> " $ ", the token at the first `$` only)) for a
random phrase of a random usable concept among the image's top 150. AdamW lr 1e-4, wd 0.01.

Queries: "a photo of $ that {caption}" with the token at the first `$`; FashionIQ's two captions,
each stripped of ". ? ," at both ends, in both orders, the two normalised features averaged.
`inversion: oti` is SEARLE-OTI: each query's reference image is inverted by OTI at query time
(its concepts ranked against the vocabulary) instead of by phi.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.data.concepts import META_NAME as CONCEPTS_META
from cirlab.data.concepts import concept_text_features, load_image_concepts, load_vocabulary, top_k_concepts
from cirlab.data.evalset import Protocol
from cirlab.data.phrases import load_phrases, phi_phrase, usable_phrases
from cirlab.errors import CirlabError
from cirlab.losses import gather_features, nt_xent
from cirlab.models import DOLLAR_TOKEN_ID, Phi
from cirlab.train.composed import ComposedRetrievalTask
from cirlab.train.config import BackboneConfig, EvalConfig, OptimizerConfig, SchedulerConfig
from cirlab.train.feature_cache import FeatureCache, autocast_tag, transform_key
from cirlab.train.oti import OTIConfig, PhraseBank, _Tokens, oti_batch

log = logging.getLogger(__name__)

INVERSIONS = ("phi", "oti")


def fashioniq_texts(first: str, second: str) -> list[str]:
    """FashionIQ's two query texts: both caption orders, each caption stripped of '.?, ' at its ends."""
    a, b = first.strip(".?, "), second.strip(".?, ")
    return [f"{a} and {b}", f"{b} and {a}"]


#: query texts per protocol text form (methods key their prompts by the form, never by benchmark)
QUERY_TEXTS = {"plain": lambda t: [t[0]], "relative_clause": lambda t: [t[0]],
               "fashioniq": lambda t: fashioniq_texts(t[0], t[1])}


class SEARLETask(ComposedRetrievalTask):
    """SEARLE's phi distillation; `inversion: oti` evaluates as SEARLE-OTI."""

    backbone_eval_mode = True

    def __init__(self, oti_tokens: Optional[str] = None, concepts: Optional[str] = None,
                 phrases: Optional[str] = None, vocabulary: Optional[str] = None,
                 phi_hidden_dim: Optional[int] = None, phi_dropout: float = 0.5, temperature: float = 0.25,
                 lambda_distil: float = 1.0, lambda_reg: float = 0.75, top_k_concepts: int = 150,
                 prompt: str = "a photo of $ that {}", inversion: str = "phi", oti: Optional[OTIConfig] = None,
                 cache_dir: Optional[str] = None, seed: int = 0,
                 backbone: Optional[BackboneConfig] = None, optimizer: Optional[OptimizerConfig] = None,
                 scheduler: Optional[SchedulerConfig] = None, evaluation: Optional[EvalConfig] = None) -> None:
        if prompt.count("$") != 1 or "{}" not in prompt or prompt.index("$") > prompt.index("{}"):
            raise CirlabError(f"SEARLE prompt {prompt!r} must hold one ' $ ' before the '{{}}' of the text",
                              "e.g. 'a photo of $ that {}'")
        if inversion not in INVERSIONS:
            raise CirlabError(f"SEARLE inversion={inversion!r} is not one of {INVERSIONS}",
                              "'phi' (SEARLE) or 'oti' (SEARLE-OTI: OTI on each query's reference at query time)")
        if temperature <= 0:
            raise CirlabError(f"SEARLE temperature={temperature} must be > 0")
        self.oti_tokens_dir = oti_tokens
        self.concepts_dir = concepts
        self.phrases_file = phrases
        self.vocabulary = vocabulary
        self.phi_hidden_dim = phi_hidden_dim
        self.phi_dropout = phi_dropout
        self.temperature = temperature
        self.lambda_distil = lambda_distil
        self.lambda_reg = lambda_reg
        self.top_k_concepts = top_k_concepts
        self.prompt = prompt
        self.inversion = inversion
        self.oti_cfg = OTIConfig.of(oti)
        self.cache_dir = cache_dir
        self.seed = seed
        self.rng = random.Random(seed)
        super().__init__(backbone, optimizer, scheduler, evaluation)

    def default_backbone(self) -> BackboneConfig:
        return BackboneConfig(image_transform="targetpad")  # the reference: target-pad everywhere

    def default_optimizer(self) -> OptimizerConfig:
        return OptimizerConfig(name="adamw", lr=1e-4, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.01)

    def configure_models(self) -> None:
        super().configure_models()
        self.backbone.set_trainable(image=False, text=False)
        self.backbone.model.logit_scale.requires_grad_(False)
        d, t = self.backbone.embed_dim, self.backbone.token_dim
        self.phi = Phi(d, self.phi_hidden_dim or 4 * d, t, dropout=self.phi_dropout)
        self._image_cache: Optional[FeatureCache] = None
        self._phrase_cache: Optional[FeatureCache] = None
        self._targets: Optional[dict[str, int]] = None
        self._target_tokens: Optional[torch.Tensor] = None
        self._image_concepts: Optional[dict[str, list[str]]] = None
        self._phrases: Optional[dict[str, list[str]]] = None
        self._oti_state: Optional[dict[str, Any]] = None
        self._tokens: Optional[_Tokens] = None

    def export_modules(self) -> dict[str, nn.Module]:
        return {"phi": self.phi}

    # ------------------------------------------------------------------ inputs on disk
    def _cache_root(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        root = getattr(self.trainer, "default_root_dir", ".") if self._trainer is not None else "."
        return Path(root) / "feature_cache"

    def _need(self, value: Optional[str], key: str, what: str) -> str:
        if not value:
            raise CirlabError(f"SEARLE needs `{key}` for {what}", f"set model.init_args.{key}")
        return value

    def load_training_inputs(self) -> None:
        """The OTI tokens (targets), each image's concepts and the usable phrases."""
        from cirlab.train.oti import load_oti_tokens

        ids, tokens = load_oti_tokens(self._need(self.oti_tokens_dir, "oti_tokens", "the distillation targets"))
        if tokens.shape[1] != self.backbone.token_dim:
            raise CirlabError(f"OTI tokens in {self.oti_tokens_dir} have width {tokens.shape[1]}, the backbone's "
                              f"tokens {self.backbone.token_dim}", "invert the images with this backbone")
        self._targets = {i: n for n, i in enumerate(ids)}
        self._target_tokens = tokens
        if self.lambda_reg > 0:
            self._image_concepts = load_image_concepts(self._need(self.concepts_dir, "concepts", "the regulariser"))
            self._phrases, _ = usable_phrases(load_phrases(self._need(self.phrases_file, "phrases", "the regulariser")))

    def configure_datamodule(self, dm: Any) -> None:
        if hasattr(dm, "decode_images"):
            dm.decode_images = False  # training reads cached image features: skip the pixels

    def on_fit_start(self) -> None:
        self.load_training_inputs()
        self.fill_image_cache()

    @torch.no_grad()
    def fill_image_cache(self) -> None:
        """Encode every training image once (eval transform); later epochs and runs reuse the features.
        Under DDP each rank encodes its share and saves it, then every rank reads all."""
        from tqdm.auto import tqdm

        dm = self.trainer.datamodule
        fp, tf = self.backbone.fingerprint(), self.image_transform(train=False)
        space = f"image-{transform_key(tf)}"
        self._image_cache = FeatureCache(self._cache_root(), fp, space)
        world = self.trainer.world_size
        pending: dict[str, torch.Tensor] = {}
        for sample in tqdm(dm.triplet_samples(transform=tf, rank=self.trainer.global_rank, world_size=world),
                           desc="image features", unit="image", disable=not self.trainer.is_global_zero,
                           mininterval=2.0):
            if sample["id"] not in self._image_cache and sample["id"] not in pending:
                pending[sample["id"]] = sample["image"]
            if len(pending) >= self.eval_cfg.batch_size:
                self._encode_pending(pending)
        self._encode_pending(pending)
        self._image_cache.save()
        if world > 1:
            self.trainer.strategy.barrier("searle-image-cache")
            self._image_cache = FeatureCache(self._cache_root(), fp, space)

    def _encode_pending(self, pending: dict[str, torch.Tensor]) -> None:
        if pending:
            ids = list(pending)
            self._image_cache.add(ids, self.backbone.encode_image(torch.stack([pending[i] for i in ids]).to(self.device)))
            pending.clear()

    def _phrase_features(self, phrases: list[str]) -> torch.Tensor:
        """The frozen tower's features of the original phrases, cached by phrase."""
        if self._phrase_cache is None:
            self._phrase_cache = FeatureCache(self._cache_root(), self.backbone.fingerprint(),
                                              "phrases" + autocast_tag(self.device.type))
        todo = self._phrase_cache.missing(phrases)
        if todo:
            with torch.no_grad():
                self._phrase_cache.add(todo, self.backbone.encode_text(self.tokens(todo).to(self.device)))
        return self._phrase_cache.get(phrases).to(self.device)

    def tokens(self, texts: list[str]) -> torch.Tensor:
        if self._tokens is None:
            self._tokens = _Tokens(self.backbone.tokenize)
        return self._tokens(texts)

    def on_train_epoch_end(self) -> None:
        if self._phrase_cache is not None:
            self._phrase_cache.save()

    # ------------------------------------------------------------------ training
    def distillation_loss(self, oti_tokens: torch.Tensor, estimated: torch.Tensor) -> torch.Tensor:
        """NT-Xent over the 2N vectors (OTI token, phi token), gathered over ranks (the global batch)."""
        return nt_xent(gather_features(oti_tokens.float()), gather_features(estimated.float()), self.temperature)

    def regulariser_pairs(self, ids: list[str]) -> list[Optional[tuple[str, str]]]:
        """Per image (phrase, concept): a uniform usable concept of its top-k, then a uniform phrase of it."""
        out: list[Optional[tuple[str, str]]] = []
        for i in ids:
            ranked = self._image_concepts.get(i)
            if ranked is None:
                raise CirlabError(f"image {i!r} has no concepts in {self.concepts_dir}",
                                  "compute the concepts on the same image shards")
            usable = [c for c in ranked[: self.top_k_concepts] if c in self._phrases]
            if not usable:
                out.append(None)
                continue
            concept = self.rng.choice(usable)
            out.append((self.rng.choice(self._phrases[concept]), concept))
        return out

    def regulariser_loss(self, estimated: torch.Tensor, pairs: list[Optional[tuple[str, str]]]) -> torch.Tensor:
        """mean 1 - cos(text(phrase), text(phrase with every concept occurrence -> " $ ", token at the first))."""
        rows = [i for i, p in enumerate(pairs) if p is not None]
        if not rows:
            return estimated.sum() * 0.0
        if len(rows) < len(pairs):
            log.warning("SEARLE: %d images of the batch have no usable concept among their top %d: no "
                        "regulariser term for them", len(pairs) - len(rows), self.top_k_concepts)
        phrases = [pairs[i][0] for i in rows]
        marked = [phi_phrase(*pairs[i]) for i in rows]
        orig = self._phrase_features(phrases)
        feats = self.backbone.encode_text_with_pseudo_tokens(self.tokens(marked).to(self.device), estimated[rows],
                                                             DOLLAR_TOKEN_ID, first_only=True)
        return (1 - F.cosine_similarity(feats.float(), orig.float(), dim=-1)).mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        ids = list(batch["id"])
        missing = [i for i in ids if i not in self._targets]
        if missing:
            raise CirlabError(f"image {missing[0]!r} has no OTI token in {self.oti_tokens_dir}",
                              "run OTI on the same image shards as the training data")
        feats = self._image_cache.get(ids).to(self.device)
        estimated = self.phi(feats)
        targets = self._target_tokens[[self._targets[i] for i in ids]].to(self.device)
        distil = self.distillation_loss(targets, estimated)
        loss = self.lambda_distil * distil
        if self.lambda_reg > 0:
            reg = self.regulariser_loss(estimated, self.regulariser_pairs(ids))
            loss = loss + self.lambda_reg * reg
            self.log("train/reg", reg, batch_size=len(ids))
        self.log("train/distil", distil, batch_size=len(ids))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(ids))
        return loss

    # ------------------------------------------------------------------ queries
    def prompt_features(self, pseudo: torch.Tensor, texts: list[str]) -> torch.Tensor:
        tokens = self.tokens([self.prompt.format(t) for t in texts]).to(self.device)
        return self.backbone.encode_text_with_pseudo_tokens(tokens, pseudo, DOLLAR_TOKEN_ID, first_only=True)

    def pseudo_tokens(self, ref_features: torch.Tensor) -> torch.Tensor:
        """The reference images' tokens: phi(feature), or OTI at query time (SEARLE-OTI)."""
        if self.inversion == "oti":
            return self.invert_by_oti(ref_features)
        return self.phi(ref_features.to(self.phi.layers[0].weight.dtype))

    def query_features(self, ref_features: torch.Tensor, texts: list[list[str]], protocol: Protocol) -> torch.Tensor:
        form = QUERY_TEXTS.get(protocol.text_format)
        if form is None:
            raise CirlabError(f"SEARLE has no query prompt for text_format {protocol.text_format!r}",
                              f"known forms: {', '.join(QUERY_TEXTS)}")
        pseudo = self.pseudo_tokens(ref_features)
        variants = [form(t) for t in texts]
        n = len(variants[0])
        if n == 1:
            return self.prompt_features(pseudo, [v[0] for v in variants])
        feats = [self.normalize(self.prompt_features(pseudo, [v[k] for v in variants])) for k in range(n)]
        return self.normalize(torch.stack(feats).mean(dim=0))

    # ------------------------------------------------------------------ SEARLE-OTI
    def _oti_inputs(self) -> dict[str, Any]:
        """Vocabulary, its concept features and the phrase bank, built once for query-time OTI."""
        if self._oti_state is None:
            vocab_source = self.vocabulary
            if vocab_source is None and self.concepts_dir and (Path(self.concepts_dir) / CONCEPTS_META).is_file():
                import json

                vocab_source = json.loads((Path(self.concepts_dir) / CONCEPTS_META).read_text())["vocabulary"]
            names = load_vocabulary(self._need(vocab_source, "vocabulary", "SEARLE-OTI's concepts"))
            bank = None
            if self.oti_cfg.lambda_reg > 0:
                bank = PhraseBank(load_phrases(self._need(self.phrases_file, "phrases", "SEARLE-OTI's regulariser")),
                                  self.oti_cfg.top_k)

            def encode(texts: list[str]) -> torch.Tensor:
                return self.backbone.encode_text(self.tokens(texts).to(self.device))

            with torch.inference_mode(False), torch.no_grad():
                feats = concept_text_features(encode, names).to(self.device)
            self._oti_state = {"names": names, "features": feats, "bank": bank, "done": {}}
        return self._oti_state

    def invert_by_oti(self, ref_features: torch.Tensor) -> torch.Tensor:
        """OTI on the reference images' features (query time), each image once; seeded by its feature."""
        st = self._oti_inputs()
        with torch.inference_mode(False), torch.enable_grad():
            feats = ref_features.detach().clone().float()  # evaluation tensors are inference tensors
            keys = [hashlib.blake2b(f.cpu().numpy().tobytes(), digest_size=12).hexdigest() for f in feats]
            todo = [k for k in dict.fromkeys(keys) if k not in st["done"]]
            first = {k: keys.index(k) for k in todo}
            cfg = self.oti_cfg
            for s in range(0, len(todo), cfg.batch_size):
                chunk = todo[s:s + cfg.batch_size]
                x = feats[[first[k] for k in chunk]]
                concepts = None
                if st["bank"] is not None:
                    idx = top_k_concepts(x, st["features"], cfg.top_k).cpu().tolist()
                    concepts = [st["bank"].concepts_for([st["names"][j] for j in row]) for row in idx]
                seed = int(chunk[0][:15], 16) ^ cfg.seed
                res = oti_batch(self.backbone, x, concepts, st["bank"], cfg, random.Random(seed),
                                torch.Generator().manual_seed(seed), self._tokens or _Tokens(self.backbone.tokenize))
                for k, tok in zip(chunk, res["ema"]):
                    st["done"][k] = tok
        return torch.stack([st["done"][k] for k in keys]).to(ref_features.device)


# ---------------------------------------------------------------------- the quickstart pipeline
def first_images(src: str | Path, out: str | Path, n: int, shard_size: int = 128) -> Path:
    """The first `n` samples of an image shard folder copied (bytes unchanged) into `out`; `out` when done."""
    import json

    from cirlab.data.shards import read_index, write_shards
    from cirlab.data.tar_format import iter_tar_members

    out = Path(out)
    if (out / "index.json").is_file() and read_index(out).total == n:
        return out

    def samples():
        left = n
        for url in read_index(src).urls:
            members: dict[str, dict[str, bytes]] = {}
            with open(url, "rb") as stream:
                for name, data in iter_tar_members(stream):
                    key, _, ext = name.partition(".")
                    members.setdefault(key, {})[ext] = data
            for key in sorted(members):
                if left == 0:
                    return
                meta = json.loads(members[key]["json"])
                image = next(v for e, v in members[key].items() if e in ("jpg", "png", "jpeg", "webp"))
                yield {**meta, "image": image}  # bytes: written unchanged
                left -= 1

    write_shards(samples(), out, "image", maxcount=shard_size)
    return out


def searle_quickstart(world: str, out: str, pretrained: Optional[str], model_name: str = "cirlab-tiny",
                      max_images: Optional[int] = 512, concepts_k: int = 20, phrases_per_concept: int = 16,
                      oti: Optional[OTIConfig] = None, epochs: int = 10, batch_size: int = 64, lr: float = 1e-3,
                      lambda_reg: float = 0.75, top_k_concepts: int = 150, seed: int = 0,
                      accelerator: str = "cpu") -> Path:
    """concepts -> phrases -> OTI -> SEARLETask fit on a synthetic world folder (data/synthetic.py
    build_world); returns the export folder (phi.safetensors, backbone.json). `max_images`: SEARLE
    learns from the world's first N training images (OTI costs 40 tower passes per image here; None:
    all). Every step skips work a previous call left in `out` (images, concepts, phrases, OTI shards);
    the fit reruns."""
    import lightning as L

    from cirlab.data.concepts import compute_concepts, synthetic_vocabulary
    from cirlab.data.phrases import generate_phrases
    from cirlab.data.retrieval import RetrievalDataModule
    from cirlab.data.shards import read_index
    from cirlab.data.synthetic import load_world
    from cirlab.train.oti import run_oti

    manifest = load_world(world)
    root = Path(out)
    images = str(manifest.path("images"))
    if max_images is not None and read_index(images).total > max_images:
        images = str(first_images(images, root / "images", max_images))
    vocab = synthetic_vocabulary(manifest.held_out)
    cfg = oti or OTIConfig(steps=40, batch_size=64, seed=seed)  # the reference: 350 steps, batch 32
    L.seed_everything(seed, verbose=False)
    task = SEARLETask(oti_tokens=str(root / "oti"), concepts=str(root / "concepts"),
                      phrases=str(root / "phrases.jsonl"), vocabulary=None, oti=cfg,
                      lambda_reg=lambda_reg, top_k_concepts=top_k_concepts,
                      cache_dir=str(root / "feature_cache"), seed=seed,
                      backbone=BackboneConfig(model_name, pretrained, image_transform="targetpad"),
                      optimizer=OptimizerConfig(name="adamw", lr=lr, weight_decay=0.01))
    bb = task.backbone
    compute_concepts(images, vocab, str(root / "concepts"), k=concepts_k, backbone=bb, progress=True)
    generate_phrases("synthetic", vocab, str(root / "phrases.jsonl"), n=phrases_per_concept, seed=seed,
                     held_out=manifest.held_out)
    run_oti(images, str(root / "oti"), concepts=str(root / "concepts"), phrases=str(root / "phrases.jsonl"),
            oti=cfg, cache_dir=str(root / "feature_cache"), backbone=bb)
    dm = RetrievalDataModule(train=images, kind="image", batch_size=batch_size, resampled=False,
                             num_workers=0, shuffle_buffer=1000, seed=seed)
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_epochs=epochs, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(root / "run"))
    trainer.fit(task, datamodule=dm)
    export = root / "export"
    task.export(export)
    return export
