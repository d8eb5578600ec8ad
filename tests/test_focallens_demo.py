"""The demo's conditional-retrieval table: run_focallens_demo at its fast scale (a few steps)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from cirlab.errors import CirlabError
from cirlab.models import Backbone
from cirlab.train.cli import main
from cirlab.train.focallens_demo import BASELINE_ROW, FOCALLENS_ROW, run_focallens_demo, shape_aware_clip


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("clip") / "export"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in Backbone("cirlab-tiny").merged_state_dict().items()},
              str(out / "backbone.safetensors"))
    return out


def test_fast_demo_returns_both_rows(small_world, clip_export, tmp_path, capsys):
    # through the command a user runs after `make demo` (cirlab demo-focallens), at the smoke scale
    assert main(["demo-focallens", "--world", str(small_world.root), "--clip", str(clip_export),
                 "--out", str(tmp_path / "fl"), "--scale", "fast"]) == 0
    assert "plain CLIP vs FocalLens (fast, " in capsys.readouterr().out
    rows = json.loads((tmp_path / "fl" / "results_conditional.json").read_text())
    assert list(rows) == [BASELINE_ROW, FOCALLENS_ROW]
    for m in rows.values():
        assert {"mAP@10", "R@1", "R@5", "R@10", "A-R@1"} <= set(m)
        assert all(0 <= m[k] <= 100 and not math.isnan(m[k]) for k in ("mAP@10", "R@1", "A-R@1"))
    # the run went through the recipe, trained, and exported FocalLens's own weights: the gates opened
    export = list((tmp_path / "fl" / "runs" / "focallens").glob("version_*/export/focallens.safetensors"))
    assert len(export) == 1 and load_file(str(export[0]))["gate"].abs().max() > 0
    assert (tmp_path / "fl" / "conditional" / "protocol.json").is_file()
    # the run's checkpoint through `cirlab evaluate` scores the same as the demo's row
    ckpt = next((tmp_path / "fl" / "runs" / "focallens").glob("version_*/checkpoints/*.ckpt"))
    assert main(["evaluate", "--ckpt", str(ckpt), "--sets", str(tmp_path / "fl" / "conditional"),
                 "--out", str(tmp_path / "eval.json")]) == 0
    scored = json.loads((tmp_path / "eval.json").read_text())
    (name, metrics), = scored.items()
    for key in ("mAP@10", "R@1", "A-R@1"):
        assert abs(metrics[key] - rows[FOCALLENS_ROW][key]) < 1e-6, (name, key)


def test_bad_inputs_are_clear_errors(small_world, clip_export, tmp_path):
    with pytest.raises(CirlabError, match="instruction shards"):
        run_focallens_demo(tmp_path, tmp_path / "o", clip_export, scale="fast")
    with pytest.raises(CirlabError, match="backbone.safetensors"):
        run_focallens_demo(small_world.root, tmp_path / "o", tmp_path, scale="fast")
    with pytest.raises(CirlabError, match="scale"):
        run_focallens_demo(small_world.root, tmp_path / "o", clip_export, scale="huge")
    # the command refuses a world without instructions/ before it pre-trains anything
    assert main(["demo-focallens", "--world", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
    with pytest.raises(CirlabError, match="objects/"):
        shape_aware_clip(tmp_path, tmp_path / "o")
