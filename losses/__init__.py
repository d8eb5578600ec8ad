"""cirlab.losses — loss functions shared by every method (imports only torch)."""

from .contrastive import LogitScale, gather_features, info_nce, nt_xent
from .regression import cosine_loss, mse_loss

__all__ = ["LogitScale", "gather_features", "info_nce", "nt_xent", "cosine_loss", "mse_loss"]
