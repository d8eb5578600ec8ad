"""CIRR and CIRCO submission files, read back from disk."""

import json

import pytest

from cirlab.data.submissions import write_cirr_submission, write_circo_submission


def _names(prefix, n):
    return [f"{prefix}-{j}" for j in range(n)]


def test_cirr_submission_roundtrip(tmp_path):
    pair_ids = [7, 12]
    ranked = [_names("r7", 60), _names("r12", 50)]
    subset = [["s1", "s2", "s3", "s4"], ["t1", "t2", "t3"]]
    p_rec, p_sub = write_cirr_submission(pair_ids, ranked, subset, tmp_path / "sub", split="test1")
    assert p_rec.name == "recall_submission_test1.json"
    assert p_sub.name == "recall_subset_submission_test1.json"
    rec, sub = json.loads(p_rec.read_text()), json.loads(p_sub.read_text())
    assert rec["version"] == "rc2" and rec["metric"] == "recall"
    assert sub["version"] == "rc2" and sub["metric"] == "recall_subset"
    assert set(rec) == {"version", "metric", "7", "12"} and set(sub) == set(rec)
    assert rec["7"] == _names("r7", 50) and len(rec["12"]) == 50
    assert sub["7"] == ["s1", "s2", "s3"] and sub["12"] == ["t1", "t2", "t3"]


def test_cirr_submission_errors(tmp_path):
    with pytest.raises(ValueError, match="has 49 names but the CIRR server needs the top 50"):
        write_cirr_submission([1], [_names("a", 49)], [["x", "y", "z"]], tmp_path)
    with pytest.raises(ValueError, match="needs the top 3"):
        write_cirr_submission([1], [_names("a", 50)], [["x", "y"]], tmp_path)
    with pytest.raises(ValueError, match="pair_ids has 2 entries but ranked_names has 1"):
        write_cirr_submission([1, 2], [_names("a", 50)], [["x", "y", "z"]] * 2, tmp_path)
    with pytest.raises(ValueError, match="repeats a query id"):
        write_cirr_submission([1, 1], [_names("a", 50)] * 2, [["x", "y", "z"]] * 2, tmp_path)


def test_circo_submission_roundtrip(tmp_path):
    ranked = [list(range(100, 160)), [str(j) for j in range(500, 550)]]
    path = write_circo_submission([0, 1], ranked, tmp_path / "circo" / "test.json")
    got = json.loads(path.read_text())
    assert set(got) == {"0", "1"}
    assert got["0"] == list(range(100, 150))
    assert got["1"] == list(range(500, 550))  # COCO ids written as integers
    assert all(len(set(v)) == 50 for v in got.values())


def test_circo_submission_errors(tmp_path):
    with pytest.raises(ValueError, match="has 49 ids but the server needs 50"):
        write_circo_submission([0], [list(range(49))], tmp_path / "x.json")
    with pytest.raises(ValueError, match="repeats an image id"):
        write_circo_submission([0], [list(range(49)) + [3]], tmp_path / "x.json")
    with pytest.raises(ValueError, match="query_ids is empty"):
        write_circo_submission([], [], tmp_path / "x.json")
