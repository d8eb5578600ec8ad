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


def _chunk_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row in ascending index order; where ties straddle the cut, the lowest indices win."""
    n = scores.shape[1]
    if k >= n:
        s, i = scores, torch.arange(n, device=scores.device).expand_as(scores)
        return s.clone(), i.clone()
    # topk picks arbitrarily among equal scores at the cut: fetch one extra item to spot such rows
    # (rare with real features) and give only them a stable full sort. Costs no extra pass.
    s, i = torch.topk(scores, k + 1, dim=1, sorted=True)
    tied = (s[:, k - 1] == s[:, k]).nonzero().flatten()
    s, i = s[:, :k].contiguous(), i[:, :k].contiguous()
    if len(tied):
        s_t, i_t = torch.sort(scores[tied], dim=1, descending=True, stable=True)
        s[tied], i[tied] = s_t[:, :k], i_t[:, :k]
    order = torch.argsort(i, dim=1)
    return s.gather(1, order), i.gather(1, order)


@torch.no_grad()
def rank(queries: Tensor, gallery: Tensor, k: int, exclude: Sequence[Sequence[int]] | None = None,
         query_chunk: int = 1024, gallery_chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Top-k gallery items per query by descending inner product (normalise both sides for cosine).

    Scores are computed in (query_chunk x gallery_chunk) blocks and merged into a running top-k, so
    memory never holds a Q x N matrix. `exclude[i]` lists gallery indices removed from query i's
    ranking (CIRR drops the reference). k > N is cut to N; slots that exclusions leave empty hold
    score -inf and index -1. Equal scores are returned lower index first. Computation is float32 on
    the gallery's device (half inputs are cast up chunk by chunk); returns (scores, indices), (Q, k).
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
    pairs = _exclusion_pairs(exclude, nq, n, device) if exclude is not None else None
    pair_cols = pairs[:, 1].contiguous() if pairs is not None else None

    best_s = torch.full((nq, k), float("-inf"), device=device)
    best_i = torch.full((nq, k), -1, dtype=torch.long, device=device)
    qc, gc = min(query_chunk, max(nq, 1)), min(gallery_chunk, n)
    # One reusable score buffer: avoids re-faulting a fresh block of pages for every chunk.
    buf = torch.empty(qc * gc, device=device)
    for g0 in range(0, n, gc):
        g1 = min(g0 + gc, n)
        g_chunk = gallery[g0:g1]
        if g_chunk.dtype != torch.float32:
            g_chunk = g_chunk.float()
        if pairs is not None:  # exclusions that fall into this gallery chunk
            lo, hi = torch.searchsorted(pair_cols, torch.tensor([g0, g1], device=device)).tolist()
            chunk_pairs = pairs[lo:hi]
        for q0 in range(0, nq, qc):
            q1 = min(q0 + qc, nq)
            scores = buf[: (q1 - q0) * (g1 - g0)].view(q1 - q0, g1 - g0)
            torch.mm(q_all[q0:q1], g_chunk.T, out=scores)
            if pairs is not None and len(chunk_pairs):
                sel = chunk_pairs[(chunk_pairs[:, 0] >= q0) & (chunk_pairs[:, 0] < q1)]
                scores[sel[:, 0] - q0, sel[:, 1] - g0] = float("-inf")
            kk = min(k, g1 - g0)
            s, i = _chunk_topk(scores, kk)
            # Running top-k first: on equal scores the earlier (lower-index) chunk wins.
            cand_s = torch.cat([best_s[q0:q1], s], dim=1)
            cand_i = torch.cat([best_i[q0:q1], i + g0], dim=1)
            order = torch.sort(cand_s, dim=1, descending=True, stable=True).indices[:, :k]
            best_s[q0:q1] = cand_s.gather(1, order)
            best_i[q0:q1] = cand_i.gather(1, order)
    # Excluded items that made it in (only when k exceeds the items left) become empty slots.
    best_i[best_s == float("-inf")] = -1
    # Final order: score descending, ties by ascending gallery index (empty slots last).
    key_i = torch.where(best_i < 0, torch.full_like(best_i, n), best_i)
    by_index = torch.argsort(key_i, dim=1, stable=True)
    best_s, best_i = best_s.gather(1, by_index), best_i.gather(1, by_index)
    by_score = torch.sort(best_s, dim=1, descending=True, stable=True).indices
    return best_s.gather(1, by_score), best_i.gather(1, by_score)


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
