"""Retrieval metrics in percent, as the papers report them: Recall@K, CIRR Recall_subset@K, CIRCO mAP@K."""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Sequence

__all__ = ["recall_at_k", "subset_recall_at_k", "map_at_k"]


def _check_ks(ks: Iterable[int]) -> list[int]:
    """Validate the cut-offs: a non-empty list of positive integers."""
    ks = list(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive integers, got {ks}")
    return ks


def _check_lengths(ranked_ids: Sequence, other: Sequence, name: str) -> None:
    """Reject empty inputs and per-query lists of different lengths."""
    if len(ranked_ids) == 0:
        raise ValueError("ranked_ids is empty; pass one ranked id list per query")
    if len(other) != len(ranked_ids):
        raise ValueError(f"ranked_ids has {len(ranked_ids)} queries but {name} has {len(other)}; "
                         "pass one entry per query")


def _targets(target: Hashable | Collection[Hashable], i: int) -> set:
    """One query's target(s) as a set: a single id, or a collection of acceptable ids."""
    if isinstance(target, (str, bytes, int)):
        return {target}
    found = set(target)
    if not found:
        raise ValueError(f"query {i} has no target id; every query needs one")
    return found


def recall_at_k(ranked_ids: Sequence[Sequence[Hashable]], target_ids: Sequence[Hashable],
                ks: Iterable[int]) -> dict[int, float]:
    """Recall@K = 100 * (queries whose target is in their top K) / (number of queries).

    A target may also be a collection of ids (a hit if any is in the top K). Rankings shorter than K
    count what they hold, so pass at least max(ks) results or the whole gallery.
    """
    ks = _check_ks(ks)
    _check_lengths(ranked_ids, target_ids, "target_ids")
    hits = dict.fromkeys(ks, 0)
    for i, (ranking, target) in enumerate(zip(ranked_ids, target_ids)):
        wanted = _targets(target, i)
        pos = next((p for p, r in enumerate(ranking) if r in wanted), None)
        for k in ks:
            hits[k] += pos is not None and pos < k
    return {k: 100.0 * hits[k] / len(ranked_ids) for k in ks}


def subset_recall_at_k(ranked_ids: Sequence[Sequence[Hashable]], target_ids: Sequence[Hashable],
                       subsets: Sequence[Collection[Hashable]], ks: Iterable[int],
                       reference_ids: Sequence[Hashable] | None = None) -> dict[int, float]:
    """CIRR Recall_subset@K: each ranking restricted to its query's subset members, then Recall@K.

    The restricted ranking keeps the gallery ranking's order. For CIRR the subset is the img_set
    members minus the reference: pass `reference_ids` (dropped from subset and ranking) or subsets
    without it. A ranking too short to contain the subset raises an error only when the result
    would depend on the missing members; ranking the whole gallery (k = N) always works.
    """
    ks = _check_ks(ks)
    _check_lengths(ranked_ids, target_ids, "target_ids")
    _check_lengths(ranked_ids, subsets, "subsets")
    if reference_ids is not None:
        _check_lengths(ranked_ids, reference_ids, "reference_ids")
    hits = dict.fromkeys(ks, 0)
    for i, (ranking, target) in enumerate(zip(ranked_ids, target_ids)):
        members = set(subsets[i])
        if reference_ids is not None:
            members.discard(reference_ids[i])
        if target not in members:
            raise ValueError(f"query {i}: target {target!r} is not among its subset members "
                             f"{sorted(map(str, members))}; Recall_subset needs it there")
        restricted = [r for r in ranking if r in members]
        pos = restricted.index(target) if target in restricted else None
        missing = members - set(restricted)
        for k in ks:
            if pos is None and len(restricted) < k and missing:
                raise ValueError(f"query {i}: the ranking lacks subset members {sorted(map(str, missing))}, "
                                 f"so Recall_subset@{k} is undecidable; rank the whole gallery (k = N)")
            hits[k] += pos is not None and pos < k
    return {k: 100.0 * hits[k] / len(ranked_ids) for k in ks}


def map_at_k(ranked_ids: Sequence[Sequence[Hashable]], gt_ids: Sequence[Collection[Hashable]],
             ks: Iterable[int]) -> dict[int, float]:
    """CIRCO mAP@K in percent: precision_i = hits(1..i) * hit[i] / i, AP@K = sum_{i<=K} precision_i / min(#gt, K).

    Mean of AP@K over queries. Every query needs at least one ground truth; rankings must not
    repeat an id within their top max(ks) (a repeat would be counted twice).
    """
    ks = _check_ks(ks)
    _check_lengths(ranked_ids, gt_ids, "gt_ids")
    kmax = max(ks)
    totals = dict.fromkeys(ks, 0.0)
    for i, (ranking, gts) in enumerate(zip(ranked_ids, gt_ids)):
        gt = _targets(gts, i)
        top = list(ranking[:kmax])
        if len(set(top)) != len(top):
            raise ValueError(f"query {i}: its ranking repeats an id in the top {kmax}; "
                             "rankings must list distinct ids")
        n_hits = 0
        precision_sum = 0.0
        cumulative = []  # cumulative[i-1] = sum of precision_1..precision_i
        for pos, r in enumerate(top, start=1):
            if r in gt:
                n_hits += 1
                precision_sum += n_hits / pos
            cumulative.append(precision_sum)
        for k in ks:
            upto = cumulative[min(k, len(cumulative)) - 1] if cumulative else 0.0
            totals[k] += upto / min(len(gt), k)
    return {k: 100.0 * totals[k] / len(ranked_ids) for k in ks}
