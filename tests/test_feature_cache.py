import torch

from cirlab.train.feature_cache import FeatureCache, transform_key
from cirlab.models import build_transform


def test_cache_round_trip_and_keys(tmp_path):
    c = FeatureCache(tmp_path, "abc123" * 4, "image-x")
    calls = []

    def enc(ids):
        calls.append(list(ids))
        return torch.stack([torch.full((4,), float(len(i))) for i in ids])

    assert c.fill(["a", "bb", "a", "ccc"], enc, batch_size=2) == 3
    assert calls == [["a", "bb"], ["ccc"]]
    c.save()
    again = FeatureCache(tmp_path, "abc123" * 4, "image-x")
    assert len(again) == 3
    assert torch.equal(again.get(["ccc", "a"]), torch.tensor([[3.0] * 4, [1.0] * 4]))
    assert again.fill(["a", "bb"], enc) == 0  # reused across runs: nothing re-encoded
    assert len(calls) == 2
    # a different backbone fingerprint never reads the old folder
    other = FeatureCache(tmp_path, "fff000" * 4, "image-x")
    assert len(other) == 0


def test_missing_id_is_a_clear_error(tmp_path):
    c = FeatureCache(tmp_path, "f" * 16, "text")
    c.add(["x"], torch.zeros(1, 2))
    try:
        c.get(["y"])
    except KeyError as e:
        assert "'y'" in str(e) and "feature cache" in str(e)
    else:
        raise AssertionError("expected KeyError")


def test_transform_key_changes_with_transform():
    a = transform_key(build_transform(64, "targetpad"))
    b = transform_key(build_transform(64, "squarepad"))
    c = transform_key(build_transform(32, "targetpad"))
    assert len({a, b, c}) == 3
    assert a == transform_key(build_transform(64, "targetpad"))
