"""Regression losses between feature vectors (SEARLE OTI content loss, LinCIR MSE)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["cosine_loss", "mse_loss"]


def _check(a: Tensor, b: Tensor, name: str) -> None:
    """Raise a clear error when the two feature tensors do not have the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"{name} needs inputs of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def cosine_loss(a: Tensor, b: Tensor) -> Tensor:
    """mean(1 - cos(a, b)) over rows (last dim is the feature dim); no normalisation needed by callers."""
    _check(a, b, "cosine_loss")
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


def mse_loss(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error over all elements, as torch.nn.functional.mse_loss(reduction='mean')."""
    _check(a, b, "mse_loss")
    return F.mse_loss(a, b)
