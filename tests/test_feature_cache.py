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


def test_transform_key_is_the_same_in_another_process():
    # the cache is shared across runs and DDP ranks: a key holding a memory address never matched
    import subprocess
    import sys

    code = ("from cirlab.models import build_transform; from cirlab.train.feature_cache import transform_key; "
            "print(transform_key(build_transform(64, 'targetpad')), transform_key(build_transform(64, 'clip')))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert other == [transform_key(build_transform(64, "targetpad")), transform_key(build_transform(64, "clip"))]


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
    parts = sorted(p.name for p in c.dir.glob("*.safetensors"))
    assert len(parts) == 15 and all(p.startswith("part-") for p in parts)  # 14 full parts + 16 rows
    inodes = {p.name: p.stat().st_ino for p in c.dir.iterdir()}  # a rewrite replaces the file
    again = SmallBlocks(tmp_path, "f" * 16, "text")
    assert sorted(again.ids) == sorted(keys)
    assert torch.equal(again.get(keys[::-1]), torch.stack([table[k] for k in keys[::-1]]))
    again.add(["new"], torch.ones(1, 8))  # a loaded cache grows; its own rows go to its own part
    assert torch.equal(again.get(["new", keys[-1]]), torch.stack([torch.ones(8), table[keys[-1]]]))
    again.save()
    assert all(p.stat().st_ino == inodes[p.name] for p in again.dir.iterdir() if p.name in inodes)
    assert len(list(again.dir.glob("*.safetensors"))) == 16
    assert len(SmallBlocks(tmp_path, "f" * 16, "text")) == 3601


def test_caches_sharing_a_folder_keep_each_others_rows(tmp_path):
    # two runs (or ranks) with the same backbone share the folder: neither overwrites the other
    a, b = SmallBlocks(tmp_path, "f" * 16, "text"), SmallBlocks(tmp_path, "f" * 16, "text")
    a.add([f"a{i}" for i in range(300)], torch.zeros(300, 4))
    b.add([f"b{i}" for i in range(300)], torch.ones(300, 4))
    a.save()
    b.save()
    a.add(["a-late"], torch.zeros(1, 4))
    a.save()
    both = SmallBlocks(tmp_path, "f" * 16, "text")
    assert len(both) == 601
    assert torch.equal(both.get(["a0", "b299", "a-late"]), torch.tensor([[0.0] * 4, [1.0] * 4, [0.0] * 4]))


def test_a_damaged_part_is_skipped_with_a_warning(tmp_path, caplog):
    c = SmallBlocks(tmp_path, "f" * 16, "text")
    c.add([str(i) for i in range(300)], torch.randn(300, 4))
    c.save()
    first = sorted(c.dir.glob("*.json"))[0]
    first.write_text('["just one id"]')
    with caplog.at_level("WARNING"):
        again = SmallBlocks(tmp_path, "f" * 16, "text")
    assert "skipping" in caplog.text and first.with_suffix(".safetensors").name in caplog.text
    assert len(again) == 300 - 256  # the other part still loads; the damaged one is recomputed
