"""Helpers for tests that run recipes through the `cirlab` CLI: a saved tiny backbone, a 2-process
DDP fit (gloo, CPU), and the feature cache a run left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from cirlab.models import Backbone
from cirlab.train.feature_cache import FeatureCache

REPO = Path(__file__).resolve().parent.parent


def save_tiny_backbone(path: Path, seed: int = 0) -> Backbone:
    """A random `cirlab-tiny` written as a `pretrained=` file; returns the model written."""
    torch.manual_seed(seed)
    tower = Backbone("cirlab-tiny")
    save_file({k: v.contiguous() for k, v in tower.merged_state_dict().items()}, str(path))
    return tower


def fit_on_two_ranks(recipe: str, runs: Path, *overrides: str) -> None:
    """`cirlab fit -c recipe` under Lightning DDP with 2 CPU processes; fails with the run's stderr."""
    r = subprocess.run([sys.executable, "-m", "cirlab.train.cli", "fit", "-c", recipe, "--trainer.accelerator=cpu",
                        "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_epochs=1",
                        f"--trainer.logger.init_args.save_dir={runs}", *overrides],
                       capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert r.returncode == 0, r.stderr[-3000:]


def open_cache(folder: Path) -> FeatureCache:
    """The cache stored in one `<fingerprint>-<space>` folder."""
    fingerprint, space = folder.name.split("-", 1)
    return FeatureCache(folder.parent, fingerprint, space)
