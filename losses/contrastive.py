"""Contrastive losses shared by every method: InfoNCE (gathered across ranks), NT-Xent, logit scale."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["gather_features", "info_nce", "LogitScale", "nt_xent"]


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(x: Tensor) -> Tensor:
    """All-gather `x` from every rank with gradient, concatenated in rank order; `x` itself if not distributed.

    Gradients flow back to each rank's own slice (open_clip's gather_with_grad), so every rank can
    compute its local rows of the global logits and DDP's gradient average gives the global gradient.
    Every rank must pass the same shape.
    """
    _, world = _world()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather  # imported lazily: needs a process group

    return torch.cat(all_gather(x.contiguous()), dim=0)


def _gather_no_grad(x: Tensor) -> Tensor:
    """All-gather a tensor that needs no gradient (ids), concatenated in rank order."""
    _, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def _gather_local_first(x: Tensor) -> Tensor:
    """All-gather without gradient, this rank's own rows first (with their gradient), then the
    other ranks' in rank order: the Pic2Word reference's gather."""
    rank, world = _world()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat([x] + parts[:rank] + parts[rank + 1:], dim=0)


def _ids_to_tensor(ids: Sequence | Tensor, n: int, device: torch.device) -> Tensor:
    """Turn per-sample ids (ints, strings or a tensor) into an int64 tensor comparable across processes."""
    if isinstance(ids, Tensor):
        out = ids.reshape(-1).to(device=device, dtype=torch.int64)
    else:
        ids = list(ids)
        if all(isinstance(i, (int,)) and not isinstance(i, bool) for i in ids):
            out = torch.tensor(ids, dtype=torch.int64, device=device)
        else:
            # Python's hash() is salted per process; a fixed digest makes ids equal on every rank.
            out = torch.tensor(
                [int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little", signed=True)
                 for i in ids],
                dtype=torch.int64, device=device)
    if out.numel() != n:
        raise ValueError(f"duplicate_ids has {out.numel()} entries but the batch has {n} samples; "
                         "pass one id per sample")
    return out


def _one_way(a: Tensor, b_all: Tensor, scale: Tensor | float, labels: Tensor,
             same_id: Tensor | None) -> Tensor:
    """Cross-entropy of scale * a @ b_all.T against labels, with same-id non-positives masked out."""
    logits = scale * (a @ b_all.T)
    if same_id is not None:
        # Samples that share the positive's id are not negatives: drop them from the softmax.
        drop = same_id.clone()
        drop[torch.arange(a.shape[0], device=a.device), labels] = False
        logits = logits.masked_fill(drop, float("-inf"))
    return F.cross_entropy(logits, labels)


def info_nce(query: Tensor, target: Tensor, logit_scale: Tensor | float, symmetric: bool = False,
             gather: bool = True, duplicate_ids: Sequence | Tensor | None = None,
             gather_with_grad: bool = True, hard_negatives: Tensor | None = None,
             hard_negative_mask: Tensor | None = None) -> Tensor:
    """InfoNCE between row-aligned `query` and `target` features (callers normalise).

    Each rank computes its B x (B*world) logits = logit_scale * query @ gathered(target).T with
    labels arange(B) + rank*B (open_clip's local-loss scheme); the mean of the ranks' losses equals
    the single-process loss on the global batch. `symmetric` averages with the target->query direction.
    `duplicate_ids`: per-sample ids; samples sharing the positive's id are masked from the softmax.
    With gather, every rank must pass the same batch size.

    `gather_with_grad=False` is Pic2Word's scheme: features gathered without gradient, the rank's own
    first, and every rank computes the whole (B*world)^2 loss; gradients reach only its own rows.
    Those rows' gradient is scaled by world (the loss value is not) so that DDP's average equals
    the single-process gradient, as in the other mode (the reference's feature gradient is 1/world
    of it, which Adam's normalisation cancels but for eps).

    `hard_negatives` (M, D): extra targets that are no query's positive (NegCLIP's swapped captions),
    appended to every query's softmax in the query->target direction only, gathered across ranks
    (every rank the same M); `hard_negative_mask` (M,) bool marks the real ones (False: padding).
    """
    if query.ndim != 2 or target.ndim != 2 or query.shape != target.shape:
        raise ValueError(f"info_nce needs query and target of the same 2-D shape (B, D), got query "
                         f"{tuple(query.shape)} and target {tuple(target.shape)}")
    rank, world = _world()
    if not (gather and world > 1):
        rank, world = 0, 1
    if hard_negatives is not None and world > 1 and not gather_with_grad:
        raise ValueError("info_nce: hard_negatives need gather_with_grad=True (the local-loss scheme)")
    if world > 1 and not gather_with_grad:
        return _info_nce_gathered_no_grad(query, target, logit_scale, symmetric, duplicate_ids, world)
    b = query.shape[0]
    labels = torch.arange(b, device=query.device) + rank * b
    target_all = gather_features(target) if world > 1 else target
    same_id = None
    if duplicate_ids is not None:
        ids = _ids_to_tensor(duplicate_ids, b, query.device)
        ids_all = _gather_no_grad(ids) if world > 1 else ids
        same_id = ids[:, None] == ids_all[None, :]
    drop = same_id
    if hard_negatives is not None:  # the query->target direction only: the negatives are no query
        target_all, drop = _with_hard_negatives(target_all, same_id, hard_negatives, hard_negative_mask, b, world)
    loss = _one_way(query, target_all, logit_scale, labels, drop)
    if symmetric:
        query_all = gather_features(query) if world > 1 else query
        loss = (loss + _one_way(target, query_all, logit_scale, labels, same_id)) / 2
    return loss


def _with_hard_negatives(target_all: Tensor, same_id: Tensor | None, negs: Tensor, mask: Tensor | None,
                         b: int, world: int) -> tuple[Tensor, Tensor]:
    """Targets with the (gathered) hard negatives appended, and the drop mask widened: padding dropped."""
    if negs.ndim != 2 or negs.shape[1] != target_all.shape[1]:
        raise ValueError(f"info_nce hard_negatives must be (M, {target_all.shape[1]}), got {tuple(negs.shape)}")
    mask = torch.ones(negs.shape[0], dtype=torch.bool, device=negs.device) if mask is None else mask.to(negs.device)
    if mask.shape != (negs.shape[0],):
        raise ValueError(f"info_nce hard_negative_mask must be ({negs.shape[0]},), got {tuple(mask.shape)}")
    negs_all = gather_features(negs) if world > 1 else negs
    mask_all = _gather_no_grad(mask.to(torch.int64)).bool() if world > 1 else mask
    if same_id is None:
        same_id = torch.zeros(b, target_all.shape[0], dtype=torch.bool, device=negs.device)
    drop = torch.cat([same_id, (~mask_all)[None, :].expand(b, -1)], dim=1)
    return torch.cat([target_all, negs_all]), drop


def _info_nce_gathered_no_grad(query: Tensor, target: Tensor, logit_scale: Tensor | float, symmetric: bool,
                               duplicate_ids: Sequence | Tensor | None, world: int) -> Tensor:
    """The whole global-batch InfoNCE on every rank from features gathered without gradient."""
    # a rank's features get only their share of the global gradient (the other ranks' rows are
    # constants here): times world, DDP's average over ranks gives the whole of it. A learnable
    # scale sees the whole loss on every rank, so its gradient needs no factor.
    query, target = _ScaleGrad.apply(query, float(world)), _ScaleGrad.apply(target, float(world))
    q_all, t_all = _gather_local_first(query), _gather_local_first(target)
    labels = torch.arange(q_all.shape[0], device=query.device)
    same_id = None
    if duplicate_ids is not None:
        ids_all = _gather_local_first(_ids_to_tensor(duplicate_ids, query.shape[0], query.device))
        same_id = ids_all[:, None] == ids_all[None, :]
    loss = _one_way(q_all, t_all, logit_scale, labels, same_id)
    if symmetric:
        loss = (loss + _one_way(t_all, q_all, logit_scale, labels, same_id)) / 2
    return loss


class LogitScale(nn.Module):
    """Logit scale stored as its log (as CLIP), optionally learnable, clamped to at most `max_value` on use."""

    def __init__(self, init: float = 1 / 0.07, learnable: bool = True, max_value: float = 100.0) -> None:
        super().__init__()
        if init <= 0:
            raise ValueError(f"LogitScale init must be > 0, got {init}")
        value = torch.tensor(math.log(init), dtype=torch.float32)
        if learnable:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)
        self.max_value = max_value

    def forward(self) -> Tensor:
        """The scale exp(log_scale), clamped to max_value (no gradient while clamped)."""
        return self.log_scale.exp().clamp(max=self.max_value)

    def extra_repr(self) -> str:
        return f"learnable={isinstance(self.log_scale, nn.Parameter)}, max_value={self.max_value}"


def nt_xent(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """SimCLR NT-Xent between two views `a`, `b` (N, D); inputs are L2-normalised inside.

    The 2N samples are anchors; each anchor's positive is its other view and the softmax runs over
    the 2N-1 other samples (self excluded), mean over 2N anchors — SEARLE's phi distillation loss.
    """
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"nt_xent needs two views of the same 2-D shape (N, D), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if temperature <= 0:
        raise ValueError(f"nt_xent temperature must be > 0, got {temperature}")
    n = a.shape[0]
    z = torch.cat([F.normalize(a, dim=1), F.normalize(b, dim=1)], dim=0)
    logits = (z @ z.T) / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    idx = torch.arange(n, device=z.device)
    labels = torch.cat([idx + n, idx])
    return F.cross_entropy(logits, labels)
