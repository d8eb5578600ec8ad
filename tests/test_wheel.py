"""cirlab installed from a built wheel (not the editable clone): recipes ship inside the package.

From an empty folder, `cirlab data synthetic` then `cirlab fit -c quickstart/clip` must run with
only the installed files: the recipe is found by name, its model configs load, and nothing reads
the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_recipe_runs_from_an_installed_wheel_in_an_empty_folder(tmp_path):
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(dist), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # a quiet build: setuptools warns about each shipped data folder missing from pyproject's packages
    assert "would be ignored" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    wheel = next(dist.glob("cirlab-*.whl"))
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # every recipe and model config of the clone ships
    shipped = sorted(str(p.relative_to(site / "cirlab" / "recipes")) for p in (site / "cirlab" / "recipes").rglob("*.yaml"))
    assert shipped == sorted(str(p.relative_to(REPO / "recipes")) for p in (REPO / "recipes").rglob("*.yaml"))
    assert "quickstart/clip.yaml" in shipped
    configs = sorted(p.name for p in (site / "cirlab" / "models" / "model_configs").glob("*.json"))
    assert configs == sorted(p.name for p in (REPO / "models" / "model_configs").glob("*.json")) and configs
    work = tmp_path / "empty"
    work.mkdir()
    # the wheel's copy comes first on the path; the clone's editable finder never gets asked
    env = {**os.environ, "PYTHONPATH": str(site)}

    def cirlab(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "import sys, cirlab; from cirlab.train.cli import main; "
                               "print('cirlab from', cirlab.__file__); sys.exit(main(sys.argv[1:]))", *args],
                              capture_output=True, text=True, timeout=600, cwd=work, env=env)

    r = cirlab("data", "synthetic", "--out", "demo_out/world", "--scenes", "60", "--queries", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"cirlab from {site}" in r.stdout
    r = cirlab("fit", "-c", "quickstart/clip", "--trainer.max_epochs=1", "--data.init_args.steps_per_epoch=2",
               "--data.init_args.batch_size=8", "--data.init_args.num_workers=0", "--trainer.enable_progress_bar=false")
    assert r.returncode == 0, r.stderr[-3000:]
    exports = list((work / "demo_out" / "runs" / "clip").glob("version_*/export/backbone.safetensors"))
    assert len(exports) == 1
