import pytest
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


class SmallBlocks(FeatureCache):
    block_rows = 256  # many blocks from a few thousand rows


def test_rows_across_many_blocks_survive_reads_saves_and_reloads(tmp_path):
    # LinCIR adds a batch and reads it back every step, over corpora of millions of captions
    torch.manual_seed(0)
    c = SmallBlocks(tmp_path, "f" * 16, "text")
    table = {}
    for step in range(12):
        ids = [f"caption {step * 300 + i}" for i in range(300)] + ["caption 0", "caption 5"]  # repeats too
        feats = torch.randn(len(ids), 8)
        c.add(ids, feats)
        for k, f in zip(ids, feats):
            table.setdefault(k, f)  # the first feature of an id is kept
        assert torch.equal(c.get(ids), torch.stack([table[k] for k in ids]))
        if step == 5:
            c.save()  # a save mid-way, then more rows into the same partial block
    keys = list(table)
    assert len(c) == len(table) == 3600 and torch.equal(c.features, torch.stack([table[k] for k in keys]))
    c.save()
    blocks = sorted(p.name for p in c.dir.glob("block-*.safetensors"))
    assert blocks == [f"block-{k:05d}.safetensors" for k in range(15)]  # 14 full blocks + 16 rows
    inodes = {p.name: p.stat().st_ino for p in c.dir.iterdir()}  # a rewrite replaces the file
    again = SmallBlocks(tmp_path, "f" * 16, "text")
    assert again.ids == keys and torch.equal(again.get(keys[::-1]), torch.stack([table[k] for k in keys[::-1]]))
    again.add(["new"], torch.ones(1, 8))  # a loaded cache grows too, into its partial last block
    assert torch.equal(again.get(["new", keys[-1]]), torch.stack([torch.ones(8), table[keys[-1]]]))
    again.save()
    changed = {p.name for p in again.dir.iterdir() if inodes.get(p.name) != p.stat().st_ino}
    assert changed == {"block-00014.safetensors", "block-00014.json"}  # full blocks are not rewritten


def test_a_damaged_cache_is_named(tmp_path):
    c = SmallBlocks(tmp_path, "f" * 16, "text")
    c.add([str(i) for i in range(300)], torch.randn(300, 4))
    c.save()
    (c.dir / "block-00000.json").write_text('["just one id"]')
    with pytest.raises(RuntimeError, match="corrupt at block-00000.safetensors: delete the folder"):
        SmallBlocks(tmp_path, "f" * 16, "text")
