"""Shared fixtures: a small synthetic world written once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# the benchmarks' official layouts in miniature, shared with the end-to-end evaluation tests
from test_benchmarks_data import circo_root, cirr_root, fiq_root  # noqa: F401

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A few hundred scenes: enough for end-to-end runs that take seconds."""
    from cirlab.data.synthetic import build_world

    return build_world(tmp_path_factory.mktemp("world") / "world", seed=0, n_train_scenes=200,
                       n_eval_queries=40, renders_per_scene=2)
