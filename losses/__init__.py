"""cirlab.losses."""
