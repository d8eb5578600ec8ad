"""Conditional retrieval sets and evaluation: ground truth by hand, untrained FocalLens = the CLIP baseline."""

import torch

from cirlab.data.synthetic import Obj
from cirlab.data.synthetic_conditional import answers_of, write_conditional_set
from cirlab.train.conditional_eval import UnconditionalBaseline, evaluate_conditional
from cirlab.train.config import BackboneConfig
from cirlab.train.focallens_task import FocalLensTask

from shard_reading import samples


def test_answers_of_by_hand():
    scene = (Obj(0, "circle", "red", "small"), Obj(4, "square", "red", "large"), Obj(8, "circle", "blue", "large"))
    assert answers_of(scene, ("count",)) == {"three"}
    assert answers_of(scene, ("colour", "circle")) == {"red", "blue"}
    assert answers_of(scene, ("shape", "red")) == {"circle", "square"}
    assert answers_of(scene, ("size", "triangle")) == set()  # does not apply: a negative


def test_set_and_untrained_model_equals_baseline(tmp_path):
    write_conditional_set(tmp_path / "cond", n_gallery=24, n_queries=8)
    qs = samples(tmp_path / "cond" / "queries")
    assert qs and all(q["ref_id"] not in q["gt_ids"] and q["texts"][0].endswith("?") for q in qs)
    torch.manual_seed(0)
    task = FocalLensTask(eval_sets=[str(tmp_path / "cond")], backbone=BackboneConfig("cirlab-tiny", freeze_text=True))
    res = task.evaluate_conditional_sets(baseline=True)
    ours, base = res["synthetic-conditional"], res["synthetic-conditional/baseline"]
    assert ours == base  # a closed gate is the plain CLIP feature
    assert {"mAP@10", "R@1", "R@10", "A-R@1"} <= set(ours) and all(0 <= ours[k] <= 100 for k in ("mAP@10", "R@1"))
    cset = task.conditional_set(str(tmp_path / "cond"))
    task.eval()  # as evaluate_conditional_sets runs it
    assert evaluate_conditional(UnconditionalBaseline(task.backbone), cset, progress=False) == base


def test_evaluator_component_is_made_in_configure_metrics_and_reads_each_set_once(tmp_path):
    from cirlab.train.conditional_eval import ConditionalEvaluator

    write_conditional_set(tmp_path / "cond", n_gallery=20, n_queries=6, seed=3)
    torch.manual_seed(0)
    task = FocalLensTask(eval_sets=[str(tmp_path / "cond")], backbone=BackboneConfig("cirlab-tiny", freeze_text=True))
    task.configure_metrics("fit")
    ev = task.conditional_evaluator()
    assert isinstance(ev, ConditionalEvaluator) and ev.paths == [str(tmp_path / "cond")]
    cset = task.conditional_set(str(tmp_path / "cond"))
    assert task.conditional_set(str(tmp_path / "cond")) is cset  # read once, kept
    base = ev.evaluate(UnconditionalBaseline(task.backbone), progress=False)["synthetic-conditional"]
    task.eval()
    assert base == evaluate_conditional(UnconditionalBaseline(task.backbone), cset, progress=False)
    assert len(cset.gallery_ids) == 20 and len(cset.queries) <= 6
