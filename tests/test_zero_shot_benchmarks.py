"""Tasks on the benchmarks' converted evaluation sets, end to end: LinCIR zero-shot and the Combiner
on FashionIQ, CIRR (val + test1) and CIRCO (val + test), and the test-server files they write."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from cirlab.data.benchmarks.circo import convert_circo
from cirlab.data.benchmarks.cirr import convert_cirr
from cirlab.data.benchmarks.fashioniq import convert_fashioniq
from cirlab.train.combiner_task import CombinerTask
from cirlab.train.commands import evaluate
from cirlab.train.config import BackboneConfig, EvalConfig
from cirlab.train.lincir_task import LinCIRTask
from test_benchmarks_data import save_image, write_json

CIRR_KEYS = {"R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "(R@5+Rs@1)/2", "score"}


def _task(name: str, **kw):
    torch.manual_seed(0)
    if name == "lincir":
        return LinCIRTask(image_tower=True, backbone=BackboneConfig("cirlab-tiny"), **kw)
    return CombinerTask(stage=2, backbone=BackboneConfig("cirlab-tiny"), **kw)


@pytest.mark.parametrize("name", ["lincir", "combiner"])
def test_every_benchmark_ranks_and_a_small_gallery_skips_only_the_server_files(name, fiq_root, cirr_root,
                                                                                 circo_root, tmp_path, caplog):
    out = tmp_path / "out"
    convert_fashioniq(fiq_root, out / "fiq", categories=("dress", "shirt"), splits=("val",))
    convert_cirr(cirr_root, out / "cirr")
    convert_circo(circo_root[0], out / "circo")
    sets = [out / "fiq/eval/val/dress", out / "fiq/eval/val/shirt", out / "cirr/eval/val",
            out / "cirr/eval/test1", out / "circo/eval/val", out / "circo/eval/test"]
    task = _task(name, evaluation=EvalConfig(submission_dir=str(tmp_path / "subs")))
    with caplog.at_level(logging.WARNING, logger="cirlab.train.evaluation"):
        results = evaluate(task, [str(s) for s in sets], accelerator="cpu")
    assert set(results) == {"fashioniq-dress", "fashioniq-shirt", "fashioniq", "cirr", "circo"}
    assert set(results["fashioniq"]) == {"R@10", "R@50", "score"}
    assert set(results["cirr"]) == CIRR_KEYS
    # the target's Recall@K next to mAP@K, as the reference evaluation reports
    assert set(results["circo"]) == {"mAP@5", "mAP@10", "mAP@25", "mAP@50", "R@5", "R@10", "R@25", "R@50", "score"}
    # galleries of 4–5 images: the servers' top-50 files cannot exist, the metrics above still do
    assert "the gallery holds only" in caplog.text
    assert not (tmp_path / "subs").exists()


@pytest.fixture()
def cirr_test1_root(tmp_path):
    """A CIRR test1 split with a gallery large enough for the server's top 50."""
    root = tmp_path / "cirr_dataset"
    names = [f"test1-{i}-0-img0" for i in range(60)]
    for n in names:
        save_image(root / "test1" / f"{n}.png", n)
    write_json(root / "cirr" / "image_splits" / "split.rc2.test1.json", {n: f"./test1/{n}.png" for n in names})
    write_json(root / "cirr" / "captions" / "cap.rc2.test1.json", [
        {"pairid": 20 + i, "reference": names[i], "caption": "make it darker",
         "img_set": {"id": i, "members": names[i:i + 6]}} for i in range(3)])
    return root


def test_lincir_writes_cirr_test1_server_files(cirr_test1_root, tmp_path):
    convert_cirr(cirr_test1_root, tmp_path / "out", splits=("test1",))
    task = _task("lincir", evaluation=EvalConfig(submission_dir=str(tmp_path / "subs")))
    evaluate(task, [str(tmp_path / "out/eval/test1")], accelerator="cpu")
    recall = json.loads((tmp_path / "subs/recall_submission_test1.json").read_text())
    subset = json.loads((tmp_path / "subs/recall_subset_submission_test1.json").read_text())
    assert recall.pop("version") == "rc2" and recall.pop("metric") == "recall"
    assert subset.pop("version") == "rc2" and subset.pop("metric") == "recall_subset"
    assert sorted(recall) == sorted(subset) == ["20", "21", "22"]
    for i in range(3):
        ref = f"test1-{i}-0-img0"
        top = recall[str(20 + i)]
        assert len(top) == len(set(top)) == 50 and ref not in top  # CIRR never ranks the reference
        members = {f"test1-{j}-0-img0" for j in range(i + 1, i + 6)}  # the set minus the reference
        assert len(subset[str(20 + i)]) == 3 and set(subset[str(20 + i)]) <= members
