"""Chunked exact top-k ranking by inner product: memory bounded for galleries of millions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["rank", "ranked_ids"]


def _exclusion_pairs(exclude: Sequence[Sequence[int]], q: int, n: int, device: torch.device) -> Tensor:
    """(M, 2) long tensor of (query, gallery) pairs to drop, sorted by gallery index; validated."""
    if len(exclude) != q:
        raise ValueError(f"exclude has {len(exclude)} entries but there are {q} queries; "
                         "pass one list of gallery indices per query")
    rows: list[int] = []
    cols: list[int] = []
    for i, items in enumerate(exclude):
        for g in items:
            g = int(g)
            if not 0 <= g < n:
                raise ValueError(f"exclude[{i}] holds gallery index {g}, outside the gallery of {n} items")
            rows.append(i)
            cols.append(g)
    pairs = torch.tensor([rows, cols], dtype=torch.long).T.reshape(-1, 2)
    pairs = pairs[torch.argsort(pairs[:, 1], stable=True)]
    return pairs.to(device)


def _topk_lowest_index(scores: Tensor, index: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """Top-k (unordered) of each row with their gallery indices; ties at the cut go to the lowest index.

    `index` holds each column's gallery index (None: the column number). torch.topk picks arbitrarily
    among equal scores at the cut, so one extra item is fetched to spot such rows (rare with real
    features) and only those rows get a stable full sort: no extra pass over the scores.
    """
    m = scores.shape[1]
    if index is None:
        index = torch.arange(m, device=scores.device).expand_as(scores)
    if k >= m:
        return scores.clone(), index.clone()
    s, p = torch.topk(scores, k + 1, dim=1, sorted=True)
    tied = (s[:, k - 1] == s[:, k]).nonzero().flatten()
    s, i = s[:, :k].contiguous(), index.gather(1, p[:, :k])
    if len(tied):
        s_t, i_t = _sort_score_then_index(scores[tied], index[tied])
        s[tied], i[tied] = s_t[:, :k], i_t[:, :k]
    return s, i


def _sort_score_then_index(scores: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Sort rows by score descending, equal scores by ascending index (two stable sorts)."""
    by_index = torch.argsort(index, dim=1, stable=True)
    scores, index = scores.gather(1, by_index), index.gather(1, by_index)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return scores.gather(1, by_score), index.gather(1, by_score)


@torch.no_grad()
def rank(queries: Tensor, gallery: Tensor, k: int, exclude: Sequence[Sequence[int]] | None = None,
         query_chunk: int = 1024, gallery_chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Top-k gallery items per query by descending inner product (normalise both sides for cosine).

    Scores are computed in (query_chunk x gallery_chunk) blocks whose top-k are merged into a
    running top-k, so memory never holds a Q x N matrix. `exclude[i]` lists gallery indices removed
    from query i's ranking (CIRR drops the reference). k > N is cut to N; slots that exclusions
    leave empty hold score -inf and index -1. Equal scores: lower index first, also at the k-th
    place. Computation is float32 on the gallery's device (half inputs are cast up chunk by
    chunk); returns (scores, indices), both (Q, k), on that device.
    """
    if queries.ndim != 2 or gallery.ndim != 2:
        raise ValueError(f"rank needs 2-D features (Q, D) and (N, D), got queries {tuple(queries.shape)} "
                         f"and gallery {tuple(gallery.shape)}")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"query features have dim {queries.shape[1]} but gallery features have dim "
                         f"{gallery.shape[1]}; encode both with the same model")
    if gallery.shape[0] == 0:
        raise ValueError("the gallery is empty; nothing to rank against")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if query_chunk < 1 or gallery_chunk < 1:
        raise ValueError(f"query_chunk and gallery_chunk must be >= 1, got {query_chunk}, {gallery_chunk}")
    device = gallery.device
    q_all = queries.to(device=device, dtype=torch.float32)
    nq, n = q_all.shape[0], gallery.shape[0]
    k = min(k, n)
    if nq == 0:
        return torch.empty(0, k, device=device), torch.empty(0, k, dtype=torch.long, device=device)
    pairs = _exclusion_pairs(exclude, nq, n, device) if exclude is not None else None
    pair_cols = pairs[:, 1].contiguous() if pairs is not None else None

    qc, gc = min(query_chunk, max(nq, 1)), min(gallery_chunk, n)
    q_starts = range(0, nq, qc)
    # Per query chunk: candidate blocks (scores, indices) not yet merged. Merging only every few
    # chunks keeps small-op overhead low; at most `merge_width` columns wait, so memory stays bounded.
    pending: dict[int, list[tuple[Tensor, Tensor]]] = {q0: [] for q0 in q_starts}
    merge_width = 16 * k

    def merge(q0: int) -> None:
        blocks = pending[q0]
        if len(blocks) > 1:
            s = torch.cat([b[0] for b in blocks], dim=1)
            i = torch.cat([b[1] for b in blocks], dim=1)
            pending[q0] = [_topk_lowest_index(s, i, k)]

    # One reusable score buffer: avoids faulting in fresh pages for every chunk.
    buf = torch.empty(qc * gc, device=device)
    for g0 in range(0, n, gc):
        g1 = min(g0 + gc, n)
        g_chunk = gallery[g0:g1]
        if g_chunk.dtype != torch.float32:
            g_chunk = g_chunk.float()
        if pairs is not None:  # exclusions that fall into this gallery chunk
            lo, hi = torch.searchsorted(pair_cols, torch.tensor([g0, g1], device=device)).tolist()
            chunk_pairs = pairs[lo:hi]
        for q0 in q_starts:
            q1 = min(q0 + qc, nq)
            scores = buf[: (q1 - q0) * (g1 - g0)].view(q1 - q0, g1 - g0)
            torch.mm(q_all[q0:q1], g_chunk.T, out=scores)
            if pairs is not None and len(chunk_pairs):
                sel = chunk_pairs[(chunk_pairs[:, 0] >= q0) & (chunk_pairs[:, 0] < q1)]
                scores[sel[:, 0] - q0, sel[:, 1] - g0] = float("-inf")
            s, i = _topk_lowest_index(scores, None, k)
            pending[q0].append((s, i + g0))
            if sum(b[0].shape[1] for b in pending[q0]) >= merge_width:
                merge(q0)
    for q0 in q_starts:
        merge(q0)
    best_s = torch.cat([pending[q0][0][0] for q0 in q_starts], dim=0)
    best_i = torch.cat([pending[q0][0][1] for q0 in q_starts], dim=0)
    # Excluded items that made it in (only when k exceeds the items left) become empty slots.
    empty = best_s == float("-inf")
    best_i = best_i.masked_fill(empty, n)  # sorts after every real index, then becomes -1
    best_s, best_i = _sort_score_then_index(best_s, best_i)
    return best_s, best_i.masked_fill(best_i == n, -1)


def ranked_ids(indices: Tensor, gallery_ids: Sequence[str]) -> list[list[str]]:
    """Map rank()'s gallery indices to gallery ids, one list per query (empty slots, -1, dropped)."""
    if indices.ndim != 2:
        raise ValueError(f"ranked_ids needs a (Q, k) index tensor, got shape {tuple(indices.shape)}")
    out: list[list[str]] = []
    n = len(gallery_ids)
    for row in indices.tolist():
        ids = []
        for j in row:
            if j < 0:
                continue
            if j >= n:
                raise ValueError(f"index {j} is outside gallery_ids of length {n}; pass the gallery's ids")
            ids.append(gallery_ids[j])
        out.append(ids)
    return out
