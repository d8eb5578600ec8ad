"""SEARLE's optimisation-based textual inversion (OTI) as a resumable, sharded batch job.

Per image one pseudo-token, initialised N(0, 0.02^2), optimised with AdamW (lr 2e-2, wd 0.01) for
350 steps per batch of 32, an EMA (0.99) of the token after each step being the output (at other step
counts the decay is scaled to leave the init the same weight: OTIConfig.decay). Loss =
(1 L_content + 0.5 L_reg) / 1.5 with L_content = 1 - cos(text(random template with " $ "), image)
and L_reg = 1 - cos(text(phrase), text(phrase with the FIRST occurrence of its concept -> " $ ")) for
a random phrase of one of the image's top-15 concepts (concepts whose phrases lack them dropped).
The original phrases' features are frozen and cached by phrase; the content prompt and the `$`
phrase run through the text tower as one batch.

The job: image shards over ranks (shard i -> rank i % world), tokens written per image shard to
``out/<shard stem>.safetensors`` ({"ema", "last"}, ids in the metadata), atomically; a rerun skips
finished shards. Every batch's randomness is seeded from (seed, shard, batch), so the tokens do not
depend on the number of ranks.
"""

from __future__ import annotations

import json
import logging
import os
import random
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from cirlab.data.concepts import CONCEPT_TEMPLATES, load_image_concepts, my_shards, rank_world, shard_batches
from cirlab.data.phrases import load_phrases, oti_phrase, usable_phrases
from cirlab.errors import CirlabError
from cirlab.models import DOLLAR_TOKEN_ID
from cirlab.train.feature_cache import FeatureCache

log = logging.getLogger(__name__)

META_NAME = "oti.json"
REFERENCE_DECAY, REFERENCE_STEPS = 0.99, 350  # the reference's EMA: 0.99 over 350 steps
INIT_WEIGHT_WARN = 0.25  # warn when the random init keeps more of the output token than this
_PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed")


@dataclass
class OTIConfig:
    """OTI's settings (the reference's defaults)."""

    steps: int = 350
    lr: float = 2e-2
    weight_decay: float = 0.01
    batch_size: int = 32
    # None: the reference's 0.99 at its 350 steps, scaled to other step counts (`decay`); a fixed 0.99
    # over 40 steps would output a token that is still 67 % its random init
    ema_decay: Optional[float] = None
    init_std: float = 0.02
    lambda_content: float = 1.0
    lambda_reg: float = 0.5
    top_k: int = 15
    precision: str = "32"  # 32 | bf16-mixed | 16-mixed (the reference: fp16 autocast on GPU)
    seed: int = 0

    def check(self) -> "OTIConfig":
        if self.precision not in _PRECISIONS:
            raise CirlabError(f"OTI precision {self.precision!r} is not one of {', '.join(_PRECISIONS)}")
        if self.steps < 1 or self.batch_size < 1 or self.top_k < 1:
            raise CirlabError("OTI steps, batch_size and top_k must be >= 1")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise CirlabError(f"OTI ema_decay={self.ema_decay} must lie in [0, 1)",
                              "or leave it unset: 0.99 at 350 steps, scaled to the steps")
        left = self.decay ** self.steps
        if left > INIT_WEIGHT_WARN:
            log.warning("OTI ema_decay=%s over %d steps: the output token (the EMA) is still %.0f %% its random "
                        "init; leave ema_decay unset (%.3f for %d steps) or raise the steps", self.ema_decay,
                        self.steps, 100 * left, REFERENCE_DECAY ** (REFERENCE_STEPS / self.steps), self.steps)
        return self

    @property
    def decay(self) -> float:
        """The EMA decay used: ema_decay, or the reference's 0.99 at 350 steps scaled to `steps` so that the
        random init keeps the same weight in the output (0.99^350 = 3 %): 0.916 for 40 steps."""
        if self.ema_decay is not None:
            return self.ema_decay
        return REFERENCE_DECAY ** (REFERENCE_STEPS / self.steps)

    @classmethod
    def of(cls, value: "OTIConfig | dict | None") -> "OTIConfig":
        """The config itself, one from a dict (a parsed command line), or the defaults; checked."""
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise CirlabError(f"unknown OTI setting(s) {sorted(unknown)}",
                                  f"known: {', '.join(cls.__dataclass_fields__)}")
            value = cls(**value)
        return (value or cls()).check()


torch.serialization.add_safe_globals([OTIConfig])  # recipe section of SEARLETask: weights_only checkpoints


def autocast_for(precision: str, device_type: str):
    """The autocast context of a Lightning-style precision string (nullcontext for 32)."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device_type, dtype=torch.float16)
    return nullcontext()


class PhraseBank:
    """The regulariser's phrases: per image, a random phrase of one of its top-k usable concepts.

    Sampling is uniform over all phrases of the image's concepts (the reference's flat list), and the
    original phrases' features (frozen tower) are computed once per phrase and cached.
    """

    def __init__(self, concept_to_phrases: dict[str, list[str]], top_k: int = 15,
                 cache: Optional[FeatureCache] = None) -> None:
        self.table, self.dropped = usable_phrases(concept_to_phrases)
        self.top_k = top_k
        self.cache = cache
        self._memory: dict[str, torch.Tensor] = {}

    def concepts_for(self, ranked: Sequence[str]) -> list[str]:
        """The image's top-k concepts (repeats removed), then those without usable phrases left out."""
        return [c for c in list(dict.fromkeys(c.strip() for c in ranked))[: self.top_k] if c in self.table]

    def sample(self, concepts: Sequence[str], rng: random.Random) -> Optional[tuple[str, str]]:
        """(phrase, concept) drawn uniformly among the phrases of `concepts`; None when there are none."""
        if not concepts:
            return None
        weights = [len(self.table[c]) for c in concepts]
        concept = rng.choices(list(concepts), weights=weights)[0]
        return rng.choice(self.table[concept]), concept

    def features(self, phrases: list[str], encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """Frozen-tower features of the original phrases (cached by phrase)."""
        if self.cache is not None:
            todo = self.cache.missing(phrases)
            if todo:
                with torch.no_grad():
                    self.cache.add(todo, encode(todo))
            return self.cache.get(phrases)
        todo = [p for p in dict.fromkeys(phrases) if p not in self._memory]
        if todo:
            with torch.no_grad():
                for p, f in zip(todo, encode(todo).float().cpu()):
                    self._memory[p] = f
        return torch.stack([self._memory[p] for p in phrases])


class _Tokens:
    """Token rows cached by text (templates and `$` phrases recur across steps and images)."""

    def __init__(self, tokenize: Callable[[list[str]], torch.Tensor], limit: int = 200_000) -> None:
        self.tokenize, self.limit, self.rows = tokenize, limit, {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        todo = [t for t in dict.fromkeys(texts) if t not in self.rows]
        if todo:
            if len(self.rows) + len(todo) > self.limit:
                self.rows.clear()
            for t, row in zip(todo, self.tokenize(todo)):
                self.rows[t] = row
        return torch.stack([self.rows[t] for t in texts])


def content_prompts(n: int, rng: random.Random, templates: Sequence[str] = CONCEPT_TEMPLATES) -> list[str]:
    """n random templates with " $ " in place of the concept."""
    return [templates[i].format(" $ ") for i in rng.choices(range(len(templates)), k=n)]


def oti_batch(backbone: Any, image_features: torch.Tensor, image_concepts: Optional[list[list[str]]],
              bank: Optional[PhraseBank], cfg: OTIConfig, rng: random.Random, generator: torch.Generator,
              tokens: Optional[_Tokens] = None,
              on_step: Optional[Callable[[int, torch.Tensor], None]] = None) -> dict[str, torch.Tensor]:
    """Invert one batch of raw image features: {"ema": (B, T), "last": (B, T), "init": (B, T)} (float32, CPU).

    `image_concepts[i]`: image i's usable concepts (PhraseBank.concepts_for). `on_step(step, token)`
    sees the token after each optimiser step (tests check the EMA against it).
    """
    dev = image_features.device
    b, width = image_features.shape[0], backbone.token_dim
    tokens = tokens or _Tokens(backbone.tokenize)
    init = torch.randn(b, width, generator=generator) * cfg.init_std
    token = torch.nn.Parameter(init.clone().to(dev))
    ema = token.detach().clone()
    decay = cfg.decay
    opt = torch.optim.AdamW([token], lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_scaler = cfg.precision == "16-mixed" and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    use_reg = bank is not None and image_concepts is not None and cfg.lambda_reg > 0
    target = image_features.detach()

    def encode_plain(texts: list[str]) -> torch.Tensor:
        with autocast_for(cfg.precision, dev.type):
            return backbone.encode_text(tokens(texts).to(dev))

    for step in range(cfg.steps):
        texts = content_prompts(b, rng)
        rows = list(range(b))
        originals: list[str] = []
        if use_reg:
            for i, concepts in enumerate(image_concepts):
                pick = bank.sample(concepts, rng)
                if pick is not None:
                    phrase, concept = pick
                    texts.append(oti_phrase(phrase, concept))
                    originals.append(phrase)
                    rows.append(i)
        with autocast_for(cfg.precision, dev.type):
            # content prompts and `$` phrases in one pass through the tower (rows are independent)
            feats = backbone.encode_text_with_pseudo_tokens(tokens(texts).to(dev), token[rows], DOLLAR_TOKEN_ID,
                                                            first_only=True)
            content = (1 - F.cosine_similarity(feats[:b].float(), target.float(), dim=-1)).mean()
            if originals:
                orig = bank.features(originals, encode_plain).to(dev)
                reg = (1 - F.cosine_similarity(feats[b:].float(), orig.float(), dim=-1)).mean()
                loss = (cfg.lambda_content * content + cfg.lambda_reg * reg) / (cfg.lambda_content + cfg.lambda_reg)
            else:
                loss = content
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        with torch.no_grad():
            ema.mul_(decay).add_(token.detach(), alpha=1 - decay)
        if on_step is not None:
            on_step(step, token.detach().clone())
    return {"ema": ema.float().cpu(), "last": token.detach().float().cpu(), "init": init}


def batch_seed(seed: int, shard: str, batch: int) -> tuple[random.Random, torch.Generator]:
    """The batch's random streams, from (seed, shard, batch): the same on any number of ranks."""
    import hashlib

    value = int.from_bytes(hashlib.blake2b(f"{seed}|{shard}|{batch}".encode(), digest_size=8).digest(), "little")
    return random.Random(value), torch.Generator().manual_seed(value % (2**63))


# ----------------------------------------------------------------------------- the batch job
def _meta(cfg: OTIConfig, fingerprint: str, image_transform: str) -> dict[str, Any]:
    # the decay as used (unset = scaled to the steps), so a resumed job compares what shaped its tokens
    return {"config": {**asdict(cfg), "ema_decay": cfg.decay}, "fingerprint": fingerprint,
            "image_transform": image_transform}


def run_oti(images: str, out: str, model_name: str = "ViT-B-32-quickgelu", pretrained: Optional[str] = "openai",
            concepts: Optional[str] = None, phrases: Optional[str] = None, oti: Optional[OTIConfig] = None,
            image_transform: str = "targetpad", device: str = "cpu", cache_dir: Optional[str] = None,
            rank: Optional[int] = None, world_size: Optional[int] = None, backbone: Any = None,
            progress: bool = True) -> dict[str, Any]:
    """OTI tokens for every image of the shard folder `images`, written to `out` per image shard.

    `concepts`: the folder compute_concepts wrote (default ``<images>/concepts``); `phrases`: the JSONL
    file generate_phrases wrote (needed unless oti.lambda_reg is 0). Shards already in `out` are
    skipped. Returns {"written": [...], "skipped": [...], "out": folder}.
    """
    from tqdm.auto import tqdm

    cfg = OTIConfig.of(oti)
    rank, world_size = rank_world(rank, world_size)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    urls, counts, stems = my_shards(images, rank, world_size)
    todo = [i for i, s in enumerate(stems) if not (out_dir / f"{s}.safetensors").is_file()]
    result = {"written": [stems[i] for i in todo], "skipped": [s for i, s in enumerate(stems) if i not in todo],
              "out": out_dir}
    if not todo:
        return result
    if cfg.lambda_reg > 0 and phrases is None:
        raise CirlabError("OTI's regulariser needs phrases", "pass phrases=<phrases.jsonl> (and concepts), "
                                                             "or set lambda_reg to 0")
    if backbone is None:
        from cirlab.models import Backbone

        backbone = Backbone(model_name, pretrained).to(device)
    backbone.eval().requires_grad_(False)
    dev = next(backbone.parameters()).device
    fp = backbone.fingerprint()
    meta = _meta(cfg, fp, image_transform)
    meta_path = out_dir / META_NAME
    if meta_path.is_file() and json.loads(meta_path.read_text()) != meta:
        raise CirlabError(f"{out_dir} holds OTI tokens made with other settings or another backbone",
                          "write to a new out folder, or delete the old one")
    from cirlab.data.concepts import write_atomic

    write_atomic(meta_path, json.dumps(meta, indent=1))

    bank, image_concepts = None, {}
    if cfg.lambda_reg > 0:
        image_concepts = load_image_concepts(concepts or Path(images) / "concepts")
        # the same space name as SEARLETask's phrase cache ("phrases", "-bfloat16"/"-float16" when mixed)
        tag = {"bf16-mixed": "-bfloat16", "16-mixed": "-float16"}.get(cfg.precision, "")
        cache = FeatureCache(cache_dir or out_dir / "feature_cache", fp, "phrases" + tag)
        bank = PhraseBank(load_phrases(phrases), cfg.top_k, cache)
    tokens = _Tokens(backbone.tokenize)
    tf = backbone.transform(image_transform, train=False)
    bar = tqdm(total=sum(counts[i] for i in todo), desc=f"OTI (rank {rank})", unit="image",
               disable=not progress, mininterval=2.0)
    without = 0
    for i in todo:
        ids, ema, last = [], [], []
        for b_no, batch in enumerate(shard_batches(urls[i], tf, cfg.batch_size)):
            with torch.no_grad(), autocast_for(cfg.precision, dev.type):
                feats = backbone.encode_image(batch["image"].to(dev)).float()
            per_image = None
            if bank is not None:
                missing = [x for x in batch["id"] if x not in image_concepts]
                if missing:
                    raise CirlabError(f"image {missing[0]!r} has no concepts in {concepts}",
                                      "rerun compute_concepts on the same image shards")
                per_image = [bank.concepts_for(image_concepts[x]) for x in batch["id"]]
                without += sum(not c for c in per_image)
            rng, gen = batch_seed(cfg.seed, stems[i], b_no)
            res = oti_batch(backbone, feats, per_image, bank, cfg, rng, gen, tokens)
            ids += list(batch["id"])
            ema.append(res["ema"])
            last.append(res["last"])
            bar.update(len(batch["id"]))
        _write_tokens(out_dir / f"{stems[i]}.safetensors", ids, ema, last, backbone.token_dim)
        if bank is not None and bank.cache is not None:
            bank.cache.save()
    bar.close()
    if without:
        log.warning("OTI: %d images had no concept with usable phrases among their top %d: they were "
                    "inverted with L_content only", without, cfg.top_k)
    return result


def _write_tokens(path: Path, ids: list[str], ema: list[torch.Tensor], last: list[torch.Tensor], width: int) -> None:
    from safetensors.torch import save_file

    tensors = {"ema": torch.cat(ema) if ema else torch.zeros(0, width),
               "last": torch.cat(last) if last else torch.zeros(0, width)}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"ids": json.dumps(ids)})
    os.replace(tmp, path)  # a killed job leaves no half-written shard


def load_oti_tokens(folder: str | os.PathLike, which: str = "ema") -> tuple[list[str], torch.Tensor]:
    """(image ids, (N, T) tokens) from every shard file run_oti wrote; `which` is "ema" (the output) or "last"."""
    from safetensors import safe_open

    root = Path(folder)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CirlabError(f"no OTI tokens in {root}", "run run_oti (cirlab searle oti) first")
    ids: list[str] = []
    parts = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            ids += json.loads(f.metadata()["ids"])
            parts.append(f.get_tensor(which))
    return ids, torch.cat(parts)
