"""Mapping networks from a CLIP feature to one pseudo-word token embedding.

Pic2WordMapper mirrors Pic2Word's IM2TEXT (keys layers.{i}.0, fc_out); Phi mirrors SEARLE's phi,
which LinCIR reuses unchanged (keys layers.{0,3,6}). Both take the raw CLIP feature.
"""

from __future__ import annotations

import torch
from torch import nn


def _check_dims(owner: str, **dims: int) -> None:
    """Fail early, naming the argument, on a non-positive dimension."""
    for name, value in dims.items():
        if int(value) <= 0:
            raise ValueError(f"{owner} {name} must be a positive integer, got {value!r}")


class Pic2WordMapper(nn.Module):
    """[Linear -> Dropout -> ReLU] x num_layers -> Linear: image feature (D) -> token embedding (T)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, dropout: float = 0.1,
                 num_layers: int = 2) -> None:
        super().__init__()
        _check_dims("Pic2WordMapper", input_dim=input_dim, hidden_dim=hidden_dim, output_dim=output_dim,
                    num_layers=num_layers)
        blocks = []
        dim = input_dim
        for _ in range(num_layers):
            # Dropout before ReLU, in this order, as in the released model (layers.{i}.0 = the Linear).
            blocks.append(nn.Sequential(nn.Linear(dim, hidden_dim), nn.Dropout(dropout), nn.ReLU()))
            dim = hidden_dim
        self.layers = nn.Sequential(*blocks)
        self.fc_out = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, T)."""
        return self.fc_out(self.layers(x))


class Phi(nn.Module):
    """SEARLE / LinCIR phi: Linear -> GELU -> Dropout -> Linear -> GELU -> Dropout -> Linear."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, dropout: float = 0.5) -> None:
        super().__init__()
        _check_dims("Phi", input_dim=input_dim, hidden_dim=hidden_dim, output_dim=output_dim)
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, T)."""
        return self.layers(x)
