"""CLIP4Cir stage-2 Combiner: fuses a reference-image feature and a text feature into one query.

Parameter names follow the released CLIP4Cir checkpoints ({'Combiner': state_dict}), so their
state dicts load directly. The fixed logit scale (100) belongs to the training task, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Combiner(nn.Module):
    """Combiner(D, P, H): out = normalise(mixed + lambda*text + (1-lambda)*image) (METHODS.md)."""

    def __init__(self, feature_dim: int, projection_dim: int, hidden_dim: int, dropout: float = 0.5) -> None:
        super().__init__()
        for name, value in (("feature_dim", feature_dim), ("projection_dim", projection_dim),
                            ("hidden_dim", hidden_dim)):
            if int(value) <= 0:
                raise ValueError(f"Combiner {name} must be a positive integer, got {value!r}")
        self.feature_dim, self.projection_dim, self.hidden_dim = feature_dim, projection_dim, hidden_dim
        self.text_projection_layer = nn.Linear(feature_dim, projection_dim)
        self.image_projection_layer = nn.Linear(feature_dim, projection_dim)
        # dropout1/2 follow the text/image projections, dropout3 the mixing branch (as in the reference).
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.combiner_layer = nn.Linear(2 * projection_dim, hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, feature_dim)
        self.dropout3 = nn.Dropout(dropout)
        # indices 0 and 3 hold the weights: the released key names are dynamic_scalar.{0,3}.
        self.dynamic_scalar = nn.Sequential(
            nn.Linear(2 * projection_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, 1), nn.Sigmoid(),
        )

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) CLIP features (B, D) in, L2-normalised combined features (B, D) out."""
        if image_features.shape != text_features.shape or image_features.shape[-1] != self.feature_dim:
            raise ValueError(f"Combiner expects image and text features of shape (B, {self.feature_dim}), "
                             f"got {tuple(image_features.shape)} and {tuple(text_features.shape)}")
        text_proj = self.dropout1(F.relu(self.text_projection_layer(text_features)))
        image_proj = self.dropout2(F.relu(self.image_projection_layer(image_features)))
        joint = torch.cat((text_proj, image_proj), dim=-1)  # text first, as the released weights expect
        mixed = self.output_layer(self.dropout3(F.relu(self.combiner_layer(joint))))
        lam = self.dynamic_scalar(joint)  # (B, 1): weight of the TEXT feature
        # The residual uses the raw features, not the projections.
        return F.normalize(mixed + lam * text_features + (1 - lam) * image_features, dim=-1)
