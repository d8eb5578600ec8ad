"""cirlab.models."""
