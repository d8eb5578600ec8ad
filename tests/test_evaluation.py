"""The shared evaluation: protocols applied to real feature rankings, checked by hand."""

import json

import pytest
import torch

from cirlab.data.evalset import Protocol
from cirlab.errors import CirlabError
from cirlab.train.evaluation import (GalleryIndex, QueryLog, group_average, protocol_score, rank_queries,
                                     score_queries, write_submission)


def _gallery():
    # 4 gallery images along distinct axes; raw (unnormalised) features of different norms
    g = GalleryIndex()
    g.add(["g0", "g1", "g2", "g3"], torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0])))
    return g


def _queries(feats, refs, targets, subsets=None, gts=None):
    q = QueryLog()
    n = len(refs)
    batch = {"id": [f"q{i}" for i in range(n)], "ref_id": refs, "target_id": targets,
             "texts": [["t"]] * n}
    if subsets is not None:
        batch["subset"] = subsets
    if gts is not None:
        batch["gt_ids"] = gts
    q.add(batch, torch.tensor(feats))
    return q


def test_cirr_excludes_reference_and_subset_recall():
    # query 0 is closest to its own reference g0, then g1 (target): R@1 = 100 only if g0 is removed
    q = _queries([[1.0, 0.5, 0.1, 0.0], [0.0, 0.0, 0.2, 1.0]], ["g0", "g3"], ["g1", "g2"],
                 subsets=[["g0", "g1", "g2"], ["g3", "g2", "g1"]])
    p = Protocol("cirr", exclude_reference=True, recall_ks=[1, 2], subset_ks=[1, 2])
    m, ranked = score_queries(p, _gallery(), q, top_k=3)
    assert ranked[0][0] == "g1" and "g0" not in ranked[0]
    # query 1 (ref g3 removed): g2 (.2) first, then g0/g1 (0): only 3 candidates remain
    assert ranked[1][0] == "g2" and "g3" not in ranked[1] and len(ranked[1]) == 3
    assert m["R@1"] == 100.0 and m["R@2"] == 100.0
    # subsets minus the reference: q0 {g1, g2} -> g1 first; q1 {g2, g1} -> g2 first
    assert m["Rs@1"] == 100.0
    # without exclusion the reference wins for query 0
    p2 = Protocol("fashioniq-dress", exclude_reference=False, recall_ks=[1])
    m2, ranked2 = score_queries(p2, _gallery(), q, top_k=3)
    assert ranked2[0][0] == "g0"
    assert ranked2[1][0] == "g3"
    assert m2["R@1"] == 0.0  # each query's own reference now ranks first


def test_map_with_several_ground_truths():
    # ranking for the query: g3 (.9), g1 (.5), g2 (.3), g0 (0) ; gts = {g1, g2}
    q = _queries([[0.0, 0.5, 0.3, 0.9]], ["g0"], ["g1"], gts=[["g1", "g2"]])
    p = Protocol("circo", exclude_reference=False, recall_ks=[], map_ks=[2, 3])
    m, _ = score_queries(p, _gallery(), q)
    # AP@2 = (0 + 1/2) / min(2, 2) = 25 %; AP@3 = (0 + 1/2 + 2/3) / 2 = 58.33 %
    assert m["mAP@2"] == pytest.approx(25.0)
    assert m["mAP@3"] == pytest.approx(100 * (0.5 + 2 / 3) / 2)


def test_fashioniq_group_average_and_scores():
    res = {"fashioniq-dress": {"R@10": 10.0, "R@50": 30.0}, "fashioniq-shirt": {"R@10": 20.0, "R@50": 40.0}}
    prot = {n: Protocol(n, group="fashioniq", recall_ks=[10, 50], score_keys=["R@10", "R@50"]) for n in res}
    avg = group_average(res, prot)["fashioniq"]
    assert avg["R@10"] == 15.0 and avg["R@50"] == 35.0 and avg["score"] == 25.0
    assert protocol_score(Protocol("cirr"), {"R@1": 1.0, "R@5": 2.0, "Rs@1": 3.0, "(R@5+Rs@1)/2": 100.0}) == 2.0


def test_breakdown_recalls_per_field_value_and_kept_out_of_the_score():
    # rankings (reference excluded): q0 -> g1 first (target g1: hit at 1), q1 -> g2 first (target g1:
    # miss at 1, hit at 2), q2 -> g3 first (target g3: hit), q3 has no change field (skipped in it)
    feats = [[1.0, 0.5, 0.1, 0.0], [0.0, 0.2, 0.9, 1.0], [0.0, 0.0, 0.2, 1.0], [0.0, 1.0, 0.0, 0.0]]
    q = QueryLog.for_protocol(Protocol("synthetic", breakdown=["change", "composition"]))
    q.add({"id": ["q0", "q1", "q2"], "ref_id": ["g0", "g3", "g0"], "target_id": ["g1", "g1", "g3"],
           "texts": [["t"]] * 3, "change": ["colour", "colour", "add"],
           "composition": ["seen", "held_out", "held_out"]}, torch.tensor(feats[:3]))
    q.add({"id": ["q3"], "ref_id": ["g0"], "target_id": ["g1"], "texts": [["t"]]}, torch.tensor(feats[3:]))
    p = Protocol("synthetic", exclude_reference=True, recall_ks=[1, 2], breakdown=["change", "composition"])
    m, ranked = score_queries(p, _gallery(), q, top_k=3)
    assert [r[0] for r in ranked] == ["g1", "g2", "g3", "g1"]
    assert m["R@1"] == 75.0 and m["R@2"] == 100.0
    assert m["change=colour/R@1"] == 50.0 and m["change=colour/R@2"] == 100.0
    assert m["change=add/R@1"] == 100.0
    assert m["composition=seen/R@1"] == 100.0 and m["composition=held_out/R@1"] == 50.0
    assert not any(k.startswith("change=None") for k in m)
    # the breakdown never changes the selection score (the mean of the overall recalls)
    assert protocol_score(p, m) == pytest.approx((75.0 + 100.0) / 2)


def test_dimension_mismatch_is_clear():
    q = _queries([[1.0, 0.0, 0.0]], ["g0"], ["g1"])
    with pytest.raises(ValueError, match="dim"):
        score_queries(Protocol("synthetic", recall_ks=[1]), _gallery(), q)


def test_missing_reference_in_gallery_is_clear():
    with pytest.raises(CirlabError, match="not in the gallery"):
        _gallery().lookup(["nope"])


def test_cirr_submission_files(tmp_path):
    g = GalleryIndex()
    feats = torch.eye(64)
    g.add([f"g{i}" for i in range(64)], feats)
    qf = torch.zeros(1, 64)
    qf[0, 0], qf[0, 1], qf[0, 2] = 1.0, 0.5, 0.1
    q = _queries(qf.tolist(), ["g0"], [None], subsets=[["g0", "g2", "g1", "g9"]])
    q.qids = ["17"]
    p = Protocol("cirr", split="test1", exclude_reference=True, recall_ks=[1], subset_ks=[1], has_targets=False,
                 submission="cirr")
    m, ranked = score_queries(p, g, q)
    assert m == {}
    paths = write_submission(p, len(g), rank_queries(p, g, q), tmp_path)
    rec = json.loads(paths[0].read_text())
    sub = json.loads(paths[1].read_text())
    assert rec["version"] == "rc2" and rec["metric"] == "recall" and rec["17"][:2] == ["g1", "g2"]
    assert len(rec["17"]) == 50 and "g0" not in rec["17"]
    assert sub["metric"] == "recall_subset" and sub["17"] == ["g1", "g2", "g9"]


def test_breakdown_by_a_list_field_is_a_clear_error():
    q = QueryLog.for_protocol(Protocol("synthetic", breakdown=["texts"]))
    q.add({"id": ["q0"], "ref_id": ["g0"], "target_id": ["g1"], "texts": [["make it red"]]},
          torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    with pytest.raises(CirlabError, match="breakdown field 'texts' holds list"):
        score_queries(Protocol("synthetic", recall_ks=[1], breakdown=["texts"]), _gallery(), q)


def test_evaluate_prints_breakdowns_on_their_own_lines():
    from cirlab.train.commands import format_metrics

    text = format_metrics("synthetic", {"R@1": 50.0, "change=add/R@1": 100.0, "change=colour/R@1": 0.0,
                                        "composition=seen/R@1": 50.0, "score": 50.0})
    assert text.splitlines() == ["synthetic: R@1 50.00, score 50.00",
                                 "  by change: add R@1 100.00, colour R@1 0.00",
                                 "  by composition: seen R@1 50.00"]


def test_protocol_rules_come_from_its_fields_not_its_name():
    # the same metrics scored under two rules: the protocol's score_keys decide, whatever the name
    m = {"R@10": 10.0, "R@50": 30.0, "R@1": 2.0}
    assert Protocol("anything", score_keys=["R@10", "R@50"]).selection_score(m) == 20.0
    assert Protocol("fashioniq-dress").selection_score(m) == pytest.approx(14.0)  # no keys: every recall
    # a protocol.json of cirlab 0.1 (no rule fields) keeps what its name meant then
    old = Protocol.from_json({"name": "fashioniq-shirt", "recall_ks": [10, 50]})
    assert old.score_keys == ["R@10", "R@50"]
    assert Protocol.from_json({"name": "cirr"}).submission == "cirr"
    assert Protocol.from_json({"name": "cirr", "submission": None, "score_keys": None}).submission is None


def test_circo_reports_recall_of_the_target_next_to_map():
    # ranking g3 (.9), g1 (.5), g2 (.3), g0 (0); target g2, gts {g1, g2}
    q = _queries([[0.0, 0.5, 0.3, 0.9]], ["g0"], ["g2"], gts=[["g1", "g2"]])
    p = Protocol("circo", recall_ks=[2, 3], map_ks=[3], score_keys=["mAP@3"])
    m, _ = score_queries(p, _gallery(), q)
    assert m["R@2"] == 0.0 and m["R@3"] == 100.0  # the target itself, not any ground truth
    assert protocol_score(p, m) == pytest.approx(100 * (0.5 + 2 / 3) / 2)
