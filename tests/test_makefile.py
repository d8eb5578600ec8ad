"""The two commands' first step: a new venv on a disk without room stops with one line before pip runs."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_a_new_venv_on_a_full_disk_stops_with_one_line_and_leaves_nothing(tmp_path):
    venv = tmp_path / "venv"
    # No disk has 10**6 GB free: the check must refuse before `python3 -m venv` or pip run.
    run = subprocess.run(["make", "-C", str(ROOT), "venv", f"VENV={venv}", "VENV_NEED_GB=1000000"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "needs about 1000000 GB of free disk" in run.stderr and "make VENV=/path/venv" in run.stderr
    assert "Traceback" not in run.stderr and "pip" not in run.stdout
    assert not venv.exists()  # nothing half-made: the next `make` checks again


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_an_existing_venv_is_not_checked_again(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text("#!/bin/sh\nexit 0\n")  # stands for an installed venv: pip calls succeed, nothing installs
    python.chmod(0o755)
    run = subprocess.run(["make", "-C", str(ROOT), "venv", f"VENV={venv}", "VENV_NEED_GB=1000000"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert (venv / ".cirlab-installed").exists()
