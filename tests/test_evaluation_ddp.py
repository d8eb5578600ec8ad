"""The evaluation component under 2 real processes (Lightning DDP, gloo) and under Lightning's defaults."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import save_file

from cirlab.data.retrieval import RetrievalDataModule
from cirlab.data.shards import read_index
from cirlab.models import Backbone
from cirlab.train.combiner_task import CombinerTask
from cirlab.train.config import BackboneConfig, OptimizerConfig


@pytest.fixture(scope="module")
def tiny_backbone_file(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("bb") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in Backbone("cirlab-tiny").merged_state_dict().items()}, str(path))
    return path


def _evaluate(n: int, backbone: Path, eval_set: Path, out: Path) -> list[dict]:
    out.mkdir()
    script = Path(__file__).with_name("ddp_eval_script.py")
    r = subprocess.run([sys.executable, str(script), str(backbone), str(eval_set), str(out), str(n)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(n)]


@pytest.mark.slow
def test_two_processes_give_the_one_process_metrics_and_split_the_gallery(small_world, tiny_backbone_file, tmp_path):
    eval_set = small_world.path("eval/test")
    total = read_index(eval_set / "gallery").total
    one = _evaluate(1, tiny_backbone_file, eval_set, tmp_path / "one")
    two = _evaluate(2, tiny_backbone_file, eval_set, tmp_path / "two")
    assert one[0]["encoded"] == total
    # each rank encoded its own half of the gallery, the halves make the whole
    assert [r["world"] for r in two] == [2, 2]
    assert sum(r["encoded"] for r in two) == total
    assert all(r["encoded"] <= 0.55 * total for r in two)
    # and every rank ends with exactly the single-process result
    for r in two:
        assert r["qids"] == one[0]["qids"]
        assert r["ranked"] == one[0]["ranked"]
        assert r["metrics"].keys() == one[0]["metrics"].keys()
        for k, v in one[0]["metrics"].items():
            assert r["metrics"][k] == pytest.approx(v, abs=1e-9), k


def _task() -> CombinerTask:
    torch.manual_seed(0)
    return CombinerTask(stage=1, backbone=BackboneConfig("cirlab-tiny", image_transform="targetpad"),
                        optimizer=OptimizerConfig("adamw", lr=1e-4))


def test_fit_with_evaluation_sets_under_lightnings_defaults(small_world, caplog):
    # the default pre-training sanity check (2 batches per loader) runs the pipeline without scoring
    task = _task()
    dm = RetrievalDataModule(train=str(small_world.path("triplets/train")), kind="triplet", batch_size=8,
                             steps_per_epoch=2, num_workers=0, val_sets=[str(small_world.path("eval/val"))],
                             eval_batch_size=16)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    assert trainer.num_sanity_val_steps == 2
    trainer.fit(task, datamodule=dm)
    full = task.last_results["synthetic"]
    assert set(full) >= {"R@1", "R@5", "R@10", "mAP@5", "score"}
    # limit_val_batches: the partial gallery is ranked as the partial set it is, and said so
    gallery_total = read_index(small_world.path("eval/val") / "gallery").total
    batches = gallery_total // 16 * 3 // 4  # three quarters of the gallery
    with caplog.at_level(logging.WARNING, logger="cirlab.train.evaluation"):
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  limit_val_batches=batches).validate(task, datamodule=dm, verbose=False)
    warning = next(r.getMessage() for r in caplog.records if "partial evaluation" in r.getMessage())
    assert f"{batches * 16} of its {gallery_total} gallery images" in warning
    partial = task.last_results["synthetic"]
    assert partial and partial != full
