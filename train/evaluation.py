"""The shared evaluation component: gallery and query features -> one ranking -> the protocol's metrics.

`RetrievalEvaluator` is made by a task's `configure_metrics` from its evaluation sets. Under DDP it
shards the work: each rank encodes its share of every gallery (the validation loaders stream the
gallery shards split by rank) and of the queries, the features are gathered, each rank ranks its
share of the queries against the whole gallery, and the rankings are gathered and scored the same
way on every rank. Only the gallery goes through Lightning's loaders, so Lightning's defaults
behave: the sanity check runs the whole pipeline on a few batches without scoring, and
`limit_val_batches` gives a partial gallery that is ranked as the partial set it is, with a warning
that says so. Every benchmark rule comes from the set's `Protocol` (data/evalset.py).

Features here are raw; ranking uses their L2-normalised form (cosine similarity, descending).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from cirlab.data.evalset import EvalSet, Protocol
from cirlab.data.submissions import SUBMISSION_FORMATS
from cirlab.errors import CirlabError
from cirlab.train.metrics import map_at_k, recall_at_k, subset_recall_at_k
from cirlab.train.ranking import rank

log = logging.getLogger(__name__)

# Frozen galleries shared between tasks of this process inside `shared_galleries()`: key -> features
_SHARED: Optional["OrderedDict[str, GalleryIndex]"] = None
_SHARED_MAX = 8


@contextmanager
def shared_galleries(max_sets: int = 8) -> Iterator[None]:
    """Inside this block, a frozen gallery encoded by one task is reused by every later task whose
    gallery encoder is the same (same method, weights, transform and precision; see
    `ComposedRetrievalTask.gallery_key`), instead of being decoded and encoded again. Scoring many
    models on one set (the demo: nine rows, three distinct image encoders) pays once per encoder.
    At most `max_sets` galleries are kept (features only), the least recently used dropped first."""
    global _SHARED, _SHARED_MAX
    outer = _SHARED
    if outer is None:
        _SHARED, _SHARED_MAX = OrderedDict(), max_sets
    try:
        yield
    finally:
        if outer is None:
            _SHARED = None


def sharing_galleries() -> bool:
    """True inside `shared_galleries()`."""
    return _SHARED is not None


#: query fields every protocol scores with (besides its breakdown fields)
_QUERY_FIELDS = ("ref_id", "target_id", "gt_ids", "subset", "texts")


@dataclass
class GalleryIndex:
    """Raw gallery features with their ids; lookup of a reference's feature by id."""

    ids: list[str] = field(default_factory=list)
    chunks: list[torch.Tensor] = field(default_factory=list)
    _feats: Optional[torch.Tensor] = None
    _pos: Optional[dict[str, int]] = None

    def add(self, ids: list[str], feats: torch.Tensor) -> None:
        self.ids.extend(str(i) for i in ids)
        self.chunks.append(feats.detach().float().cpu())
        self._feats = None
        self._pos = None

    def __len__(self) -> int:
        return len(self.ids)

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

    def sorted_by_id(self) -> "GalleryIndex":
        """The same gallery in id order: the order no longer depends on how ranks split the shards."""
        order = sorted(range(len(self.ids)), key=self.ids.__getitem__)
        out = GalleryIndex()
        if self.ids:
            out.add([self.ids[i] for i in order], self.features[order])
        return out

    def lookup(self, ids: list[str]) -> torch.Tensor:
        """Raw features of these gallery ids (the reference image is taken from the gallery, not re-encoded)."""
        pos = self.position
        missing = [i for i in ids if i not in pos]
        if missing:
            raise CirlabError(f"reference image(s) {missing[:3]} are not in the gallery",
                              "an evaluation set must hold every reference image in its gallery")
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
        self.ref_ids.extend(str(r) for r in batch["ref_id"])
        self.target_ids.extend(batch.get("target_id") or [None] * n)
        self.gt_ids.extend(batch.get("gt_ids") or [[]] * n)
        self.subsets.extend(batch.get("subset") or [[]] * n)
        self.texts.extend(batch.get("texts") or [[]] * n)
        self.chunks.append(feats.detach().float().cpu())
        for name, values in self.fields.items():
            values.extend(batch.get(name) or [None] * n)

    def __len__(self) -> int:
        return len(self.qids)

    @property
    def features(self) -> torch.Tensor:
        return torch.cat(self.chunks) if self.chunks else torch.empty(0)

    @classmethod
    def for_protocol(cls, protocol: Protocol) -> "QueryLog":
        """A log that also keeps the query fields the protocol breaks its recalls down by (and each
        query's own gallery under a per-query-gallery protocol)."""
        names = list(protocol.breakdown) + (["gallery"] if protocol.per_query_gallery else [])
        return cls(fields={name: [] for name in names})


@dataclass
class RankedQueries:
    """What scoring needs of each query once it is ranked (features are no longer needed)."""

    qids: list[str]
    ref_ids: list[str]
    target_ids: list[Optional[str]]
    gt_ids: list[list[str]]
    subsets: list[list[str]]
    texts: list[list[str]]
    fields: dict[str, list[Any]]
    ranked: list[list[str]]         # top-K gallery ids, best first
    subset_ranked: list[list[str]]  # subset members (reference removed) by similarity; [] without subsets

    @classmethod
    def merge(cls, parts: Sequence["RankedQueries"]) -> "RankedQueries":
        """Concatenate the ranks' shares and put them in query-id order (independent of the world size)."""
        def cat(name: str) -> list[Any]:
            return [x for p in parts for x in getattr(p, name)]
        qids = cat("qids")
        order = sorted(range(len(qids)), key=qids.__getitem__)
        pick = lambda xs: [xs[i] for i in order]  # noqa: E731
        names = parts[0].fields.keys() if parts else []
        return cls(qids=pick(qids), ref_ids=pick(cat("ref_ids")), target_ids=pick(cat("target_ids")),
                   gt_ids=pick(cat("gt_ids")), subsets=pick(cat("subsets")), texts=pick(cat("texts")),
                   fields={n: pick([x for p in parts for x in p.fields[n]]) for n in names},
                   ranked=pick(cat("ranked")), subset_ranked=pick(cat("subset_ranked")))


# ----------------------------------------------------------------------------- ranking and scores
def rank_queries(protocol: Protocol, gallery: GalleryIndex, queries: QueryLog, top_k: int = 50,
                 query_chunk: int = 1024, gallery_chunk: int = 65536) -> RankedQueries:
    """Rank every query against the gallery under the protocol (reference removed where it says so)."""
    if not queries.chunks:
        raise CirlabError(f"evaluation set {protocol.name!r} produced no queries", "check its queries/ shards")
    q = F.normalize(queries.features, dim=-1)
    g = F.normalize(gallery.features, dim=-1)
    if protocol.per_query_gallery:
        ranked = per_query_rankings(protocol, q, g, gallery, queries)
        return RankedQueries(list(queries.qids), list(queries.ref_ids), list(queries.target_ids),
                             [list(x or []) for x in queries.gt_ids], [list(x or []) for x in queries.subsets],
                             [list(x or []) for x in queries.texts], {n: list(v) for n, v in queries.fields.items()},
                             ranked, [[] for _ in ranked])
    exclude = None
    if protocol.exclude_reference:
        pos = gallery.position
        exclude = [[pos[r]] if r in pos else [] for r in queries.ref_ids]
    ks = sorted(set(protocol.recall_ks) | set(protocol.map_ks))
    sub = SUBMISSION_FORMATS.get(protocol.submission or "")
    k = max([top_k] + ks + ([sub.top] if sub else []))
    most_excluded = max((len(e) for e in exclude), default=0) if exclude else 0
    _, idx = rank(q, g, max(1, min(k, len(gallery.ids) - most_excluded)), exclude=exclude,
                  query_chunk=query_chunk, gallery_chunk=gallery_chunk)
    ranked = [[gallery.ids[j] for j in row] for row in idx.tolist()]
    subset_k = max(protocol.subset_ks + ([sub.subset_top] if sub else []), default=0)
    subset_ranked = subset_rankings_from_features(q, g, gallery, queries, subset_k) if subset_k else \
        [[] for _ in ranked]
    return RankedQueries(list(queries.qids), list(queries.ref_ids), list(queries.target_ids),
                         [list(x or []) for x in queries.gt_ids], [list(x or []) for x in queries.subsets],
                         [list(x or []) for x in queries.texts], {n: list(v) for n, v in queries.fields.items()},
                         ranked, subset_ranked)


def score_ranked(protocol: Protocol, r: RankedQueries) -> dict[str, float]:
    """The protocol's metrics (percent) from rankings: R@K, Rs@K, mAP@K and breakdown recalls."""
    metrics: dict[str, float] = {}
    if not protocol.has_targets or not r.qids:
        return metrics
    if protocol.recall_ks:
        for kk, v in recall_at_k(r.ranked, r.target_ids, protocol.recall_ks).items():
            metrics[f"R@{kk}"] = v
    if protocol.subset_ks:
        for kk, v in subset_recall_at_k(r.subset_ranked, r.target_ids, r.subsets, protocol.subset_ks).items():
            metrics[f"Rs@{kk}"] = v
        if "R@5" in metrics and "Rs@1" in metrics:
            metrics["(R@5+Rs@1)/2"] = (metrics["R@5"] + metrics["Rs@1"]) / 2
    if protocol.map_ks:
        gts = [g_ if g_ else [t] for g_, t in zip(r.gt_ids, r.target_ids)]
        for kk, v in map_at_k(r.ranked, gts, protocol.map_ks).items():
            metrics[f"mAP@{kk}"] = v
    metrics.update(breakdown_recalls(protocol, r.fields, r.ranked, r.target_ids))
    return metrics


def score_queries(protocol: Protocol, gallery: GalleryIndex, queries: QueryLog, top_k: int = 50,
                  query_chunk: int = 1024, gallery_chunk: int = 65536) -> tuple[dict[str, float], list[list[str]]]:
    """Rank and score in one process; returns (metrics, top-K ids per query)."""
    r = rank_queries(protocol, gallery, queries, top_k, query_chunk, gallery_chunk)
    return score_ranked(protocol, r), r.ranked


def breakdown_recalls(protocol: Protocol, fields: dict[str, list[Any]], ranked: list[list[str]],
                      target_ids: list[Optional[str]]) -> dict[str, float]:
    """Recall@K per value of each breakdown field ("change=colour/R@10"); queries without one are skipped.

    The keys do not start with "R@", so they never enter the selection score.
    """
    out: dict[str, float] = {}
    if not protocol.recall_ks:
        return out
    for name in protocol.breakdown:
        values = fields.get(name, [])
        bad = next((v for v in values if v is not None and not isinstance(v, (str, int, float, bool))), None)
        if bad is not None:
            raise CirlabError(f"breakdown field {name!r} holds {type(bad).__name__} values ({bad!r})",
                              "break down by a field with one string or number per query, or drop it "
                              "from the protocol's breakdown")
        for value in sorted({v for v in values if v is not None}, key=str):
            rows = [i for i, v in enumerate(values) if v == value]
            sub = recall_at_k([ranked[i] for i in rows], [target_ids[i] for i in rows], protocol.recall_ks)
            out.update({f"{name}={value}/R@{kk}": v for kk, v in sub.items()})
    return out


def per_query_rankings(protocol: Protocol, q: torch.Tensor, g: torch.Tensor, gallery: GalleryIndex,
                       queries: QueryLog) -> list[list[str]]:
    """Each query's own gallery (its `gallery` field) ranked by similarity, best first: GeneCIS.

    Only members whose features were encoded take part (all of them, unless limit_val_batches cut the
    gallery); the reference is removed where the protocol says so. Ties keep the listed order, as a
    sort of the benchmark's similarity row does (its target comes first).
    """
    pos = gallery.position
    lists = queries.fields.get("gallery", [])
    out = []
    for i, (members, ref) in enumerate(zip(lists, queries.ref_ids)):
        if not isinstance(members, (list, tuple)) or not members:
            raise CirlabError(f"evaluation set {protocol.name!r}: query {queries.qids[i]} has no `gallery` list, and "
                              "its protocol ranks each query over its own gallery (per_query_gallery)",
                              "write the set with `cirlab data genecis`, or give every query a gallery list of ids")
        keep = [str(m) for m in dict.fromkeys(members) if str(m) in pos
                and not (protocol.exclude_reference and str(m) == ref)]
        if not keep:
            out.append([])
            continue
        scores = g[[pos[m] for m in keep]] @ q[i]
        order = torch.sort(scores, descending=True, stable=True).indices.tolist()
        out.append([keep[j] for j in order])
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


def write_submission(protocol: Protocol, gallery_size: int, r: RankedQueries, out_dir: str | Path) -> list[Path]:
    """The protocol's test-server files (none when it names no format)."""
    if not protocol.submission:
        return []
    fmt = SUBMISSION_FORMATS.get(protocol.submission)
    if fmt is None:
        raise CirlabError(f"protocol {protocol.name!r} names submission format {protocol.submission!r}",
                          f"known formats: {', '.join(sorted(SUBMISSION_FORMATS))}")
    shortest = min((len(x) for x in r.ranked), default=fmt.top)
    if shortest < fmt.top:
        # the servers take exactly their top N; a smaller custom gallery still gets its metrics
        log.warning("no %s %s test-server file: it needs the top %d of every ranking, and %s", protocol.name,
                    protocol.split, fmt.top, f"the gallery holds only {gallery_size} images" if
                    gallery_size - protocol.exclude_reference < fmt.top else
                    f"evaluation.top_k ranks {shortest}: set it to at least {fmt.top}")
        return []
    return [Path(p) for p in fmt.write(r.qids, r.ranked, r.subset_ranked, out_dir, protocol.split)]


def group_average(results: dict[str, dict[str, float]], protocols: dict[str, Protocol]) -> dict[str, dict[str, float]]:
    """Average metrics over sets sharing a group (FashionIQ's three categories), plus their score."""
    groups: dict[str, list[str]] = {}
    for name, p in protocols.items():
        if p.group:
            groups.setdefault(p.group, []).append(name)
    out: dict[str, dict[str, float]] = {}
    for group, names in groups.items():
        present = [n for n in names if n in results]
        keys = set.intersection(*(set(results[n]) for n in present)) if present else set()
        avg = {k: sum(results[n][k] for n in present) / len(present) for k in sorted(keys) if k != "score"}
        avg["score"] = protocols[present[0]].selection_score(avg) if present else float("nan")
        out[group] = avg
    return out


def protocol_score(protocol: Protocol, metrics: dict[str, float]) -> float:
    """The one number model selection maximises for this benchmark (see Protocol.selection_score)."""
    return protocol.selection_score(metrics)


def save_results(results: dict[str, dict[str, float]], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1))


# ----------------------------------------------------------------------------- the component
def _all_gather(obj: Any, world_size: int) -> list[Any]:
    """Every rank's `obj` (a list of one entry in a single process)."""
    if world_size <= 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


@dataclass
class EvalContext:
    """What the evaluator needs from the run: the world, the stage and where files go."""

    rank: int = 0
    world_size: int = 1
    sanity: bool = False
    out_dir: Optional[Path] = None
    stage: str = "val"


class RetrievalEvaluator:
    """Evaluation of composed-retrieval tasks over a list of evaluation sets (one loader each).

    The task gives two functions: ``encode_gallery(images) -> raw features`` (called from the task's
    validation/test step on its rank's gallery batches) and ``encode_queries(ref_features, texts,
    protocol) -> raw features`` (called at the end). ``gallery_frozen()`` says whether the gallery
    features may be kept between evaluations (the task declares what they depend on).
    """

    def __init__(self, sets: Sequence[EvalSet], top_k: int = 50, query_chunk: int = 1024,
                 gallery_chunk: int = 65536, query_batch_size: int = 128) -> None:
        self.sets = list(sets)
        self.top_k = top_k
        self.query_chunk = query_chunk
        self.gallery_chunk = gallery_chunk
        self.query_batch_size = query_batch_size
        self.names = self._unique_names()
        self._partial: dict[int, GalleryIndex] = {}
        self._cached: dict[int, GalleryIndex] = {}
        self.gallery_keys: dict[int, str] = {}  # set index -> key of its encoder, inside shared_galleries()
        self.encoded_images = 0  # gallery images this rank encoded (the DDP split is measured with it)
        self.last_rankings: dict[str, RankedQueries] = {}
        self.selection_score: Optional[float] = None  # mean of the sets' scores after `finish`

    def _unique_names(self) -> list[str]:
        names: list[str] = []
        for i, es in enumerate(self.sets):
            n = es.protocol.name
            names.append(n if n not in names else f"{n}-{i}")
        return names

    # -- called by the task
    def reset(self) -> None:
        """Start an evaluation pass (cached galleries stay)."""
        self._partial = {}

    def needs_gallery(self, set_idx: int) -> bool:
        """False when this set's gallery features are kept from an earlier pass (frozen image side)."""
        return set_idx not in self._cached

    def adopt_shared(self, set_idx: int, key: str) -> bool:
        """Take this set's gallery from `shared_galleries()` if a task with the same encoder left it."""
        self.gallery_keys[set_idx] = key
        if set_idx in self._cached or _SHARED is None or key not in _SHARED:
            return set_idx in self._cached
        _SHARED.move_to_end(key)
        self._cached[set_idx] = _SHARED[key]
        return True

    def add_gallery(self, set_idx: int, ids: Sequence[str], feats: torch.Tensor) -> None:
        self._partial.setdefault(set_idx, GalleryIndex()).add(list(ids), feats)
        self.encoded_images += len(ids)

    def finish(self, ctx: EvalContext, encode_queries: Callable[[torch.Tensor, list[list[str]], Protocol], torch.Tensor],
               gallery_frozen: bool, device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
        """Gather, rank, score every set; returns {set name: metrics} (the same on every rank)."""
        results: dict[str, dict[str, float]] = {}
        protocols: dict[str, Protocol] = {}
        for i, es in enumerate(self.sets):
            name = self.names[i]
            gallery = self._cached.get(i)
            if gallery is None:
                parts = _all_gather(self._partial.get(i, GalleryIndex()), ctx.world_size)
                gallery = GalleryIndex()
                for p in parts:
                    if p.ids:
                        gallery.add(p.ids, p.features)
                gallery = gallery.sorted_by_id()
            complete = len(gallery) >= es.gallery.total
            if ctx.sanity:
                self._smoke(es, gallery, encode_queries, device)
                continue
            if complete and gallery_frozen:
                self._cached[i] = gallery
                key = self.gallery_keys.get(i)
                if key is not None and _SHARED is not None:
                    _SHARED[key] = gallery
                    _SHARED.move_to_end(key)
                    while len(_SHARED) > _SHARED_MAX:
                        _SHARED.popitem(last=False)
            if len(gallery) == 0:
                log.warning("evaluation set %s: no gallery image was encoded (trainer.limit_val_batches?): skipped",
                            es.root)
                continue
            mine = self._encode_queries(es, gallery, encode_queries, ctx, complete, device)
            ranked = RankedQueries.merge(_all_gather(
                rank_queries(es.protocol, gallery, mine, self.top_k, self.query_chunk, self.gallery_chunk)
                if len(mine) else _empty_ranked(es.protocol), ctx.world_size))
            if not complete:
                log.warning("partial evaluation of %s: %d of its %d gallery images were encoded "
                            "(trainer.limit_val_batches); %d queries whose images all lie in that part are "
                            "ranked against it, and its metrics are those of this partial set", es.root,
                            len(gallery), es.gallery.total, len(ranked.qids))
            self.last_rankings[name] = ranked
            if ctx.rank == 0 and ctx.out_dir is not None and (not es.protocol.has_targets or ctx.stage == "test"):
                for path in write_submission(es.protocol, len(gallery), ranked, ctx.out_dir):
                    log.info("wrote test-server file %s", path)
            metrics = score_ranked(es.protocol, ranked)
            if metrics:
                metrics["score"] = es.protocol.selection_score(metrics)
                results[name] = metrics
                protocols[name] = es.protocol
        for group, avg in group_average(results, protocols).items():
            results[group] = avg
        # the run's selection score: the mean over benchmarks (a group such as FashionIQ counts once)
        top = [m["score"] for n, m in results.items() if n not in protocols or protocols[n].group is None]
        self.selection_score = sum(top) / len(top) if top else None
        return results

    # -- internals
    def _query_stream(self, es: EvalSet, ctx: EvalContext):
        from cirlab.data.streaming import ShardStream

        # json only: the reference feature comes from the gallery, never re-encoded
        return ShardStream(es.queries.root, "query", resampled=False, shuffle=False, shuffle_buffer=0,
                           batch_size=self.query_batch_size, rank=ctx.rank, world_size=ctx.world_size,
                           equal_steps=False, decode_images=False)

    @torch.no_grad()
    def _encode_queries(self, es: EvalSet, gallery: GalleryIndex, encode, ctx: EvalContext, complete: bool,
                        device) -> QueryLog:
        """This rank's share of the queries, with features (a partial gallery keeps the queries it covers)."""
        log_ = QueryLog.for_protocol(es.protocol)
        pos = gallery.position
        for batch in self._query_stream(es, ctx):
            batch.pop("__stream__", None)
            if not complete:
                keep = [j for j in range(len(batch["ref_id"])) if _covered(batch, j, pos)]
                if not keep:
                    continue
                batch = {k: [v[j] for j in keep] if isinstance(v, list) else v for k, v in batch.items()}
            ref = gallery.lookup([str(r) for r in batch["ref_id"]]).to(device)
            feats = encode(ref, [list(t) for t in batch["texts"]], es.protocol)
            log_.add(batch, feats)
        return log_

    @torch.no_grad()
    def _smoke(self, es: EvalSet, gallery: GalleryIndex, encode, device) -> None:
        """The sanity check: one batch of queries through the task on the few gallery features there are."""
        if len(gallery) == 0:
            return
        batch = next(iter(self._query_stream(es, EvalContext())), None)
        if batch is None:
            raise CirlabError(f"evaluation set {es.root} has no queries", "check its queries/ shards")
        n = min(len(batch["ref_id"]), 4)
        ref = gallery.features[torch.arange(n) % len(gallery)].to(device)
        feats = encode(ref, [list(t) for t in batch["texts"][:n]], es.protocol)
        if feats.shape[0] != n or feats.shape[-1] != gallery.features.shape[-1]:
            raise RuntimeError(f"query features of shape {tuple(feats.shape)} do not match gallery features "
                               f"of dimension {gallery.features.shape[-1]}")


def _covered(batch: dict[str, Any], j: int, pos: dict[str, int]) -> bool:
    """A query of a partial gallery is kept when its reference and a target lie in that part."""
    if str(batch["ref_id"][j]) not in pos:
        return False
    targets = [t for t in ([batch.get("target_id", [None] * (j + 1))[j]] + list(batch.get("gt_ids", [[]] * (j + 1))[j]))
               if t is not None]
    return not targets or any(str(t) in pos for t in targets)


def _empty_ranked(protocol: Protocol) -> RankedQueries:
    return RankedQueries([], [], [], [], [], [], {n: [] for n in protocol.breakdown}, [], [])
