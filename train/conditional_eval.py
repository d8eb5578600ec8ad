"""Conditional retrieval evaluation (FocalLens's protocol family): image + instruction -> images, -> answers.

For a set written by `cirlab.data.synthetic_conditional` (query = gallery image + instruction,
positives = gallery images sharing the instruction's answer):
- image -> image: every gallery image is encoded under each distinct instruction of the queries
  (features cached per (instruction, image); each instruction's text features computed once), a
  query's feature is its reference image's entry under its own instruction, the reference is excluded;
  mAP@K and R@K (any positive in the top K), also per question type;
- image -> answer text: the query's conditional feature ranks the set's distinct answers; A-R@1;
- the unconditional CLIP baseline is the same code with an encoder that ignores the instruction.
Features are raw; ranking uses their L2-normalised form (cosine), through train/ranking.py `rank`.
Every rank runs the whole set (they are small); the numbers are the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol as TypingProtocol, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cirlab.data.evalset import load_eval_set
from cirlab.data.streaming import ShardStream
from cirlab.errors import CirlabError
from cirlab.train.metrics import map_at_k, recall_at_k
from cirlab.train.ranking import rank, ranked_ids


class ConditionalEncoder(TypingProtocol):
    """What the evaluation needs of a model (raw features, any device)."""

    def encode_instruction(self, instruction: str) -> Any: ...

    def conditional_features(self, images: torch.Tensor, instruction: Any) -> torch.Tensor: ...

    def text_features(self, texts: list[str]) -> torch.Tensor: ...


@dataclass
class ConditionalSet:
    """A conditional evaluation set in memory: gallery images (transformed) and the query records."""

    name: str
    root: Path
    gallery_ids: list[str]
    gallery_images: torch.Tensor
    queries: list[dict[str, Any]]
    recall_ks: list[int]
    map_ks: list[int]
    breakdown: list[str]


def load_conditional_set(path: str | Path, transform: Callable, batch_size: int = 256) -> ConditionalSet:
    """Read a conditional set folder (protocol text_format 'instruction') with `transform` on its images."""
    es = load_eval_set(path)
    if es.protocol.text_format != "instruction":
        raise CirlabError(f"{path} is a {es.protocol.name!r} set with text_format {es.protocol.text_format!r}, "
                          "not a conditional set", "write one with cirlab.data.synthetic_conditional")
    ids, images = [], []
    for batch in ShardStream(es.root / "gallery", "image", transform=transform, resampled=False, shuffle=False,
                             batch_size=batch_size, rank=0, world_size=1):
        ids.extend(batch["id"])
        images.append(batch["image"])
    queries = []
    for batch in ShardStream(es.root / "queries", "query", resampled=False, shuffle=False, batch_size=batch_size,
                             rank=0, world_size=1, decode_images=False):
        n = len(batch["id"])
        queries.extend({k: v[i] for k, v in batch.items() if isinstance(v, list)} for i in range(n))
    return ConditionalSet(es.protocol.name, es.root, ids, torch.cat(images), queries,
                          list(es.protocol.recall_ks), list(es.protocol.map_ks) or [10], list(es.protocol.breakdown))


@torch.no_grad()
def evaluate_conditional(encoder: ConditionalEncoder, cset: ConditionalSet, batch_size: int = 256,
                         device: torch.device | str = "cpu", progress: bool = True) -> dict[str, float]:
    """mAP@K / R@K of image+instruction -> image, per question type, and answer-text R@1 (percent)."""
    index = {g: i for i, g in enumerate(cset.gallery_ids)}
    missing = [q["ref_id"] for q in cset.queries if q["ref_id"] not in index]
    if missing:
        raise CirlabError(f"{cset.root}: query reference images {missing[:3]} are not in the gallery",
                          "conditional sets draw their queries from the gallery; rewrite the set")
    instructions = list(dict.fromkeys(q["texts"][0] for q in cset.queries))
    cache: dict[str, torch.Tensor] = {}  # instruction -> normalised features of the whole gallery
    for instruction in tqdm(instructions, desc=f"{cset.name}: gallery per instruction", disable=not progress):
        handle = encoder.encode_instruction(instruction)
        parts = [encoder.conditional_features(cset.gallery_images[s:s + batch_size].to(device), handle).float()
                 for s in range(0, len(cset.gallery_ids), batch_size)]
        cache[instruction] = F.normalize(torch.cat(parts), dim=-1)

    kmax = max(cset.recall_ks + cset.map_ks)
    ranked: list[list[str]] = [[] for _ in cset.queries]
    query_feats = torch.empty(len(cset.queries), next(iter(cache.values())).shape[1])
    for instruction, feats in cache.items():
        rows = [i for i, q in enumerate(cset.queries) if q["texts"][0] == instruction]
        refs = [index[cset.queries[i]["ref_id"]] for i in rows]
        q = feats[refs]
        query_feats[rows] = q.cpu()
        _, idx = rank(q, feats, kmax, exclude=[[r] for r in refs])
        for i, r in zip(rows, ranked_ids(idx.cpu(), cset.gallery_ids)):
            ranked[i] = r

    gt = [q["gt_ids"] for q in cset.queries]
    out = _scores(ranked, gt, cset.recall_ks, cset.map_ks)
    for field in cset.breakdown:
        for value in sorted({str(q.get(field)) for q in cset.queries}):
            rows = [i for i, q in enumerate(cset.queries) if str(q.get(field)) == value]
            for k, v in _scores([ranked[i] for i in rows], [gt[i] for i in rows], cset.recall_ks,
                                cset.map_ks).items():
                out[f"{field}={value}/{k}"] = v

    answers = sorted({q["answer"] for q in cset.queries})
    text = F.normalize(encoder.text_features(answers).float(), dim=-1).cpu()
    best = (query_feats @ text.T).argmax(dim=1)
    pos = {a: i for i, a in enumerate(answers)}
    truth = torch.tensor([pos[q["answer"]] for q in cset.queries])
    out["A-R@1"] = 100.0 * (best == truth).float().mean().item()
    out["chance_A-R@1"] = 100.0 / len(answers)
    return out


def _scores(ranked: Sequence[Sequence[str]], gt: Sequence[Sequence[str]], recall_ks: list[int],
            map_ks: list[int]) -> dict[str, float]:
    out = {f"mAP@{k}": v for k, v in map_at_k(ranked, gt, map_ks).items()}
    out.update({f"R@{k}": v for k, v in recall_at_k(ranked, gt, recall_ks).items()})
    return out


class UnconditionalBaseline:
    """Plain CLIP features of a Backbone: the instruction is ignored (the baseline FocalLens must beat)."""

    def __init__(self, backbone: Any) -> None:
        self.backbone = backbone

    def encode_instruction(self, instruction: str) -> None:
        return None

    def conditional_features(self, images: torch.Tensor, instruction: Any) -> torch.Tensor:
        return self.backbone.encode_image(images)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        device = next(self.backbone.parameters()).device
        return self.backbone.encode_text(self.backbone.tokenize(texts).to(device))


class ConditionalEvaluator:
    """The conditional protocol family's evaluation component, the sibling of train/evaluation.py's
    RetrievalEvaluator: made by a task's `configure_metrics` from its set folders, it reads each set
    once (with the task's evaluation transform) and scores any `ConditionalEncoder` on all of them,
    and the unconditional baseline of a backbone on the same sets."""

    def __init__(self, paths: Sequence[str | Path], transform: Callable, batch_size: int = 256) -> None:
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.batch_size = batch_size
        self._sets: dict[str, ConditionalSet] = {}

    def conditional_set(self, path: str | Path) -> ConditionalSet:
        """The set at `path` in memory (read on first use, then kept)."""
        key = str(Path(path).resolve())
        if key not in self._sets:
            self._sets[key] = load_conditional_set(path, self.transform, self.batch_size)
        return self._sets[key]

    def evaluate(self, encoder: ConditionalEncoder, device: torch.device | str = "cpu", baseline: Any = None,
                 paths: Sequence[str | Path] | None = None, progress: bool = True) -> dict[str, dict[str, float]]:
        """{set name: metrics}; with a `baseline` backbone also '<name>/baseline' (its plain features)."""
        results: dict[str, dict[str, float]] = {}
        for i, path in enumerate(self.paths if paths is None else paths):
            cset = self.conditional_set(path)
            name = cset.name if cset.name not in results else f"{cset.name}-{i}"
            results[name] = evaluate_conditional(encoder, cset, self.batch_size, device, progress)
            if baseline is not None:
                results[f"{name}/baseline"] = evaluate_conditional(UnconditionalBaseline(baseline), cset,
                                                                   self.batch_size, device, progress)
        return results
