"""The global random states (torch CPU and CUDA, numpy, python `random`) as plain checkpoint data.

A requeued run restores them at the step it resumes from, so dropout masks and any other draw from
the global generators continue as in an uninterrupted run. Stored as tensors, ints and lists only,
so that checkpoints keep loading with torch.load(weights_only=True).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def collect_rng_states() -> dict[str, Any]:
    """This process's global random states."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global random states saved by `collect_rng_states`."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        # a requeue may see another number of devices: the ones both have
        for index, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
