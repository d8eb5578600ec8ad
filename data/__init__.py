"""cirlab.data."""
