"""Shared evaluation: collect gallery and query features per evaluation set, rank, score.

Every method ranks the same way; only how a query feature is made differs (the task's job).
Features here are raw; ranking uses their L2-normalised form (cosine similarity, descending).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from cirlab.data.evalset import Protocol
from cirlab.train.metrics import map_at_k, recall_at_k, subset_recall_at_k
from cirlab.train.ranking import rank
from cirlab.train.submissions import CIRCO_TOP, CIRR_TOP, write_circo_submission, write_cirr_submission

log = logging.getLogger(__name__)


@dataclass
class GalleryIndex:
    """Raw gallery features with their ids; lookup of a reference's feature by id."""

    ids: list[str] = field(default_factory=list)
    chunks: list[torch.Tensor] = field(default_factory=list)
    _feats: Optional[torch.Tensor] = None
    _pos: Optional[dict[str, int]] = None

    def add(self, ids: list[str], feats: torch.Tensor) -> None:
        self.ids.extend(ids)
        self.chunks.append(feats.detach().float().cpu())
        self._feats = None
        self._pos = None

    @property
    def features(self) -> torch.Tensor:
        if self._feats is None:
            self._feats = torch.cat(self.chunks) if self.chunks else torch.empty(0)
            self.chunks = [self._feats]
        return self._feats

    @property
    def position(self) -> dict[str, int]:
        if self._pos is None:
            self._pos = {i: n for n, i in enumerate(self.ids)}
        return self._pos

    def lookup(self, ids: list[str]) -> torch.Tensor:
        """Raw features of these gallery ids (the reference image is taken from the gallery, not re-encoded)."""
        pos = self.position
        missing = [i for i in ids if i not in pos]
        if missing:
            raise KeyError(f"reference image(s) {missing[:3]} are not in the gallery; the evaluation set "
                           "must include every reference image in its gallery")
        return self.features[[pos[i] for i in ids]]


@dataclass
class QueryLog:
    """Query features and what the protocol needs to score them."""

    qids: list[str] = field(default_factory=list)
    ref_ids: list[str] = field(default_factory=list)
    target_ids: list[Optional[str]] = field(default_factory=list)
    gt_ids: list[list[str]] = field(default_factory=list)
    subsets: list[list[str]] = field(default_factory=list)
    texts: list[list[str]] = field(default_factory=list)
    chunks: list[torch.Tensor] = field(default_factory=list)
    fields: dict[str, list[Any]] = field(default_factory=dict)  # the protocol's breakdown fields

    def add(self, batch: dict[str, Any], feats: torch.Tensor) -> None:
        n = feats.shape[0]
        self.qids.extend(str(x) for x in batch.get("pairid", batch["id"]))
        self.ref_ids.extend(batch["ref_id"])
        self.target_ids.extend(batch.get("target_id", [None] * n))
        self.gt_ids.extend(batch.get("gt_ids", [[]] * n))
        self.subsets.extend(batch.get("subset", [[]] * n))
        self.texts.extend(batch.get("texts", [[]] * n))
        self.chunks.append(feats.detach().float().cpu())
        for name, values in self.fields.items():
            values.extend(batch.get(name) or [None] * n)

    @classmethod
    def for_protocol(cls, protocol: Protocol) -> "QueryLog":
        """A log that also keeps the query fields the protocol breaks its recalls down by."""
        return cls(fields={name: [] for name in protocol.breakdown})


def protocol_score(protocol: Protocol, metrics: dict[str, float]) -> float:
    """The one number model selection maximises for this benchmark.

    FashionIQ: (R@10 + R@50)/2 (averaged over categories by the caller); CIRR: mean of R@1/5/10/50
    and Rs@1/2/3 (CLIP4Cir's selection); mAP benchmarks: mean mAP; otherwise mean of all recalls.
    """
    vals = [v for k, v in metrics.items() if k.startswith(("R@", "Rs@", "mAP@"))]
    if protocol.name.startswith("fashioniq"):
        vals = [metrics[k] for k in ("R@10", "R@50") if k in metrics]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def score_queries(protocol: Protocol, gallery: GalleryIndex, queries: QueryLog, top_k: int = 50,
                  query_chunk: int = 1024, gallery_chunk: int = 65536) -> tuple[dict[str, float], list[list[str]]]:
    """Rank every query against the gallery under the protocol; return (metrics, top-K ids)."""
    if not queries.chunks:
        raise ValueError(f"evaluation set {protocol.name!r} produced no queries")
    q = F.normalize(torch.cat(queries.chunks), dim=-1)
    g = F.normalize(gallery.features, dim=-1)
    exclude = None
    if protocol.exclude_reference:
        pos = gallery.position
        exclude = [[pos[r]] if r in pos else [] for r in queries.ref_ids]
    ks = sorted(set(protocol.recall_ks) | set(protocol.map_ks))
    k = max([top_k] + ks)
    most_excluded = max((len(e) for e in exclude), default=0) if exclude else 0
    _, idx = rank(q, g, max(1, min(k, len(gallery.ids) - most_excluded)), exclude=exclude,
                  query_chunk=query_chunk, gallery_chunk=gallery_chunk)
    ranked = [[gallery.ids[j] for j in row] for row in idx.tolist()]
    metrics: dict[str, float] = {}
    if protocol.has_targets:
        if protocol.recall_ks:
            for kk, v in recall_at_k(ranked, queries.target_ids, protocol.recall_ks).items():
                metrics[f"R@{kk}"] = v
        if protocol.subset_ks:
            sub_ranked = subset_rankings_from_features(q, g, gallery, queries, max(protocol.subset_ks))
            for kk, v in subset_recall_at_k(sub_ranked, queries.target_ids, queries.subsets, protocol.subset_ks).items():
                metrics[f"Rs@{kk}"] = v
            if "R@5" in metrics and "Rs@1" in metrics:
                metrics["(R@5+Rs@1)/2"] = (metrics["R@5"] + metrics["Rs@1"]) / 2
        if protocol.map_ks:
            gts = [g_ if g_ else [t] for g_, t in zip(queries.gt_ids, queries.target_ids)]
            for kk, v in map_at_k(ranked, gts, protocol.map_ks).items():
                metrics[f"mAP@{kk}"] = v
        metrics.update(breakdown_recalls(protocol, queries, ranked))
    return metrics, ranked


def breakdown_recalls(protocol: Protocol, queries: QueryLog, ranked: list[list[str]]) -> dict[str, float]:
    """Recall@K per value of each breakdown field ("change=colour/R@10"); queries without one are skipped.

    The keys do not start with "R@", so they never enter the selection score.
    """
    out: dict[str, float] = {}
    if not protocol.recall_ks:
        return out
    for name in protocol.breakdown:
        values = queries.fields.get(name, [])
        bad = next((v for v in values if v is not None and not isinstance(v, (str, int, float, bool))), None)
        if bad is not None:
            raise ValueError(f"breakdown field {name!r} holds {type(bad).__name__} values ({bad!r}); "
                             "break down by a field with one string or number per query, or drop it from "
                             "the protocol's breakdown")
        for value in sorted({v for v in values if v is not None}, key=str):
            rows = [i for i, v in enumerate(values) if v == value]
            sub = recall_at_k([ranked[i] for i in rows], [queries.target_ids[i] for i in rows], protocol.recall_ks)
            out.update({f"{name}={value}/R@{kk}": v for kk, v in sub.items()})
    return out


def subset_rankings_from_features(q: torch.Tensor, g: torch.Tensor, gallery: GalleryIndex, queries: QueryLog,
                                  k: int = 3) -> list[list[str]]:
    """Each query's subset members (reference removed) ranked by similarity: CIRR Recall_subset.

    Scores only the few members of each subset, so the full gallery is never ranked for this.
    """
    pos = gallery.position
    out = []
    for i, (sub, ref) in enumerate(zip(queries.subsets, queries.ref_ids)):
        members = [m for m in dict.fromkeys(sub) if m != ref and m in pos]
        if not members:
            out.append([])
            continue
        scores = g[[pos[m] for m in members]] @ q[i]
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        out.append([members[j] for j in order[:k]])
    return out


def write_submission(protocol: Protocol, gallery: GalleryIndex, queries: QueryLog, ranked: list[list[str]], out_dir: str | Path) -> list[Path]:
    """Test-server files for CIRR and CIRCO; other benchmarks have none."""
    out = Path(out_dir)
    if protocol.name not in ("cirr", "circo"):
        return []
    need = CIRR_TOP if protocol.name == "cirr" else CIRCO_TOP
    shortest = min((len(r) for r in ranked), default=need)
    if shortest < need:
        # the servers take exactly the top 50; a smaller custom gallery still gets its metrics
        log.warning("no %s %s test-server file: it needs the top %d of every ranking, and %s", protocol.name,
                    protocol.split, need, f"the gallery holds only {len(gallery.ids)} images" if
                    len(gallery.ids) - protocol.exclude_reference < need else
                    f"evaluation.top_k ranks {shortest}: set it to at least {need}")
        return []
    out.mkdir(parents=True, exist_ok=True)
    if protocol.name == "cirr":
        q = F.normalize(torch.cat(queries.chunks), dim=-1)
        g = F.normalize(gallery.features, dim=-1)
        subs = subset_rankings_from_features(q, g, gallery, queries, 3)
        paths = write_cirr_submission(queries.qids, [r[:50] for r in ranked], subs, out, split=protocol.split)
        return [Path(p) for p in paths]
    if protocol.name == "circo":
        path = out / f"circo_submission_{protocol.split}.json"
        write_circo_submission(queries.qids, [r[:50] for r in ranked], path)
        return [path]
    return []


def group_average(results: dict[str, dict[str, float]], protocols: dict[str, Protocol]) -> dict[str, dict[str, float]]:
    """Average metrics over sets sharing a group (FashionIQ's three categories), plus their score."""
    groups: dict[str, list[str]] = {}
    for name, p in protocols.items():
        if p.group:
            groups.setdefault(p.group, []).append(name)
    out: dict[str, dict[str, float]] = {}
    for group, names in groups.items():
        keys = set.intersection(*(set(results[n]) for n in names if n in results)) if names else set()
        avg = {k: sum(results[n][k] for n in names) / len(names) for k in sorted(keys) if k != "score"}
        if "R@10" in avg and "R@50" in avg:
            avg["score"] = (avg["R@10"] + avg["R@50"]) / 2
        out[group] = avg
    return out


def save_results(results: dict[str, dict[str, float]], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1))
