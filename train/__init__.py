"""cirlab.train."""
