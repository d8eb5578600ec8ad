"""Hand-worked rankings for Recall@K, Recall_subset@K (CIRR) and mAP@K (CIRCO)."""

import pytest
import torch

from cirlab.train.metrics import map_at_k, recall_at_k, subset_recall_at_k
from cirlab.train.ranking import rank, ranked_ids

GALLERY = ["ref0", "a", "b", "c", "d"]


def _cirr_rankings(exclude):
    # One-hot gallery, so a query's score for item j is simply its j-th weight.
    gallery = torch.eye(5)
    queries = torch.tensor([
        [0.9, 0.1, 0.5, 0.3, 0.2],   # full order: ref0, b, c, d, a   (reference = ref0)
        [0.4, 0.6, 0.1, 0.95, 0.0],  # full order: c, a, ref0, b, d   (reference = c)
    ])
    _, idx = rank(queries, gallery, 5, exclude=exclude)
    return ranked_ids(idx, GALLERY)


def test_cirr_recall_with_reference_excluded():
    ranked = _cirr_rankings(exclude=[[0], [3]])
    assert ranked == [["b", "c", "d", "a"], ["a", "ref0", "b", "d"]]
    # targets: b at position 1 for query 0, b at position 3 for query 1
    r = recall_at_k(ranked, ["b", "b"], [1, 2, 3])
    assert r == {1: pytest.approx(100 * 1 / 2), 2: pytest.approx(100 * 1 / 2), 3: pytest.approx(100 * 2 / 2)}
    # without the exclusion the reference would take rank 1 of query 0 and push b to rank 2
    plain = _cirr_rankings(exclude=None)
    assert plain[0][:2] == ["ref0", "b"]
    assert recall_at_k(plain, ["b", "b"], [1, 2])[1] == pytest.approx(0.0)
    assert recall_at_k(plain, ["b", "b"], [1, 2])[2] == pytest.approx(50.0)  # query 0 at 2, query 1 at 4


def test_cirr_subset_recall():
    ranked = _cirr_rankings(exclude=[[0], [3]])
    # img_set members include the reference; subset = members minus the reference
    members = [{"ref0", "b", "d", "a"}, {"c", "ref0", "b", "d"}]
    refs = ["ref0", "c"]
    # query 0 restricted: b, d, a -> b at 1; query 1 restricted: ref0, b, d -> b at 2
    expected = {1: 100 * 1 / 2, 2: 100 * 2 / 2, 3: 100 * 2 / 2}
    got = subset_recall_at_k(ranked, ["b", "b"], members, [1, 2, 3], reference_ids=refs)
    assert got == pytest.approx(expected)
    # the same when callers pass subsets without the reference themselves
    got2 = subset_recall_at_k(ranked, ["b", "b"], [m - {r} for m, r in zip(members, refs)], [1, 2, 3])
    assert got2 == pytest.approx(expected)


def test_subset_recall_errors():
    with pytest.raises(ValueError, match="not among its subset members"):
        subset_recall_at_k([["a", "b"]], ["z"], [{"a", "b"}], [1])
    # ranking truncated to one item that is not the target, subset member "b" missing: undecidable at 2
    with pytest.raises(ValueError, match="lacks subset members"):
        subset_recall_at_k([["a", "x"]], ["b"], [{"a", "b"}], [2])
    # ... but decidable at 1: "a" is first among the subset whatever comes later
    assert subset_recall_at_k([["a", "x"]], ["b"], [{"a", "b"}], [1]) == {1: 0.0}


def test_recall_target_absent_and_errors():
    ranked = [["a", "b", "c"], ["d", "e", "f"]]
    # query 0 target c at 3; query 1 target z absent from its ranking
    assert recall_at_k(ranked, ["c", "z"], [1, 3]) == {1: 0.0, 3: pytest.approx(50.0)}
    # a target may be a collection of acceptable ids: query 1 now hits "e" at 2
    assert recall_at_k(ranked, ["c", {"z", "e"}], [1, 2]) == {1: 0.0, 2: pytest.approx(50.0)}
    with pytest.raises(ValueError, match="ranked_ids is empty"):
        recall_at_k([], [], [1])
    with pytest.raises(ValueError, match="ranked_ids has 2 queries but target_ids has 1"):
        recall_at_k(ranked, ["c"], [1])
    with pytest.raises(ValueError, match="ks must be"):
        recall_at_k(ranked, ["c", "z"], [0])


def test_map_at_k_hand_worked():
    ranked = [
        ["g1", "x1", "g2", "x2", "x3", "g3"],  # 3 gts: hits at 1, 3, 6
        ["y1", "h1", "y2", "y3", "y4", "y5"],  # 1 gt (fewer than K): hit at 2
        ["z1", "z2", "z3", "z4", "z5", "z6"],  # gt absent
    ]
    gts = [["g1", "g2", "g3"], ["h1"], ["t"]]
    # precisions: A: p1 = 1/1, p3 = 2/3, p6 = 3/6; B: p2 = 1/2
    ap_a = {2: 1 / min(3, 2), 5: (1 + 2 / 3) / min(3, 5), 6: (1 + 2 / 3 + 3 / 6) / min(3, 6)}
    ap_b = {2: (1 / 2) / min(1, 2), 5: (1 / 2) / 1, 6: (1 / 2) / 1}
    expected = {k: 100 * (ap_a[k] + ap_b[k] + 0.0) / 3 for k in (2, 5, 6)}
    assert map_at_k(ranked, gts, [2, 5, 6]) == pytest.approx(expected)
    assert expected[5] == pytest.approx(100 * (5 / 9 + 1 / 2) / 3)  # 35.185...
    # all ground truths first: AP = 1 at any K
    assert map_at_k([["a", "b", "c"]], [{"a", "b"}], [1, 2, 5]) == pytest.approx({1: 100.0, 2: 100.0, 5: 100.0})
    # K cut before the second hit: hits at 1 and 4, K = 3 -> p1 / min(2, 3)
    assert map_at_k([["a", "x", "y", "b"]], [["a", "b"]], [3])[3] == pytest.approx(100 * 1 / 2)


def test_map_errors():
    with pytest.raises(ValueError, match="query 0 has no target id"):
        map_at_k([["a"]], [[]], [1])
    with pytest.raises(ValueError, match="repeats an id"):
        map_at_k([["a", "a"]], [["a"]], [2])
    with pytest.raises(ValueError, match="gt_ids has 2"):
        map_at_k([["a"]], [["a"], ["b"]], [1])
