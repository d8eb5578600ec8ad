"""Streaming shards: decode errors counted, node/worker splitting, equal steps, resume, shuffle, mixing."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from cirlab.data.shards import write_shards
from cirlab.data.streaming import ShardStream, StreamLoader, collate, make_dataset


def _pairs(prefix: str, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": f"{prefix}{i}", "image": Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)),
             "text": f"text {prefix}{i}"} for i in range(n)]


def _write(folder: Path, counts: list[int], prefix: str = "s") -> list[str]:
    """Pair shards with the given per-shard counts; returns the ids in write order."""
    samples = _pairs(prefix, sum(counts))
    it = iter(samples)
    folder.mkdir(parents=True)
    # write shard by shard so counts can be uneven, then one index over all of them
    from cirlab.data.shards import INDEX_NAME, ShardIndex
    names = []
    for k, c in enumerate(counts):
        part = [next(it) for _ in range(c)]
        idx = write_shards(part, folder / f"tmp{k}", "pair", maxcount=c, image_format="png")
        os.rename(idx.urls[0], folder / f"shard-{k:06d}.tar")
        names.append(f"shard-{k:06d}.tar")
    (folder / INDEX_NAME).write_text(json.dumps(ShardIndex("pair", names, counts, folder).to_json()))
    return [s["id"] for s in samples]


def _ids(items) -> list[str]:
    out = []
    for it in items:
        out += it["id"] if isinstance(it["id"], list) else [it["id"]]
    return out


def _rewrite(path: Path, edit) -> None:
    """Rewrite a tar, passing its [(name, bytes)] list through edit."""
    with tarfile.open(path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    members = edit(members)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


# ----------------------------------------------------------------------------- decode errors


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_samples_skipped_and_counted(tmp_path, num_workers):
    ids = _write(tmp_path / "d", [6, 6, 6])
    d = tmp_path / "d"
    key = lambda i: f"{i:010d}"  # noqa: E731  (keys number the samples of each shard)

    # shard 0: corrupt json member in sample 2, sample 4 lacks its txt member
    _rewrite(d / "shard-000000.tar", lambda ms: [
        (n, b"{not json" if n == f"{key(2)}.json" else b) for n, b in ms if n != f"{key(4)}.txt"])
    # shard 1: undecodable image in its 4th sample (id 9)
    _rewrite(d / "shard-000001.tar", lambda ms: [
        (n, b"\x89PNG\r\n\x1a\n garbage" if n == f"{key(3)}.png" else b) for n, b in ms])
    # shard 2: truncated in the middle of its 4th sample's image (id 15)
    with tarfile.open(d / "shard-000002.tar") as tf:
        cut = tf.getmember(f"{key(3)}.png").offset_data + 5
    with open(d / "shard-000002.tar", "r+b") as f:
        f.truncate(cut)

    stream = make_dataset(d, "pair", resampled=False, shuffle_buffer=0)
    got = _ids(StreamLoader(stream, num_workers=num_workers))
    lost = {ids[i] for i in (2, 4, 9, 15, 16, 17)}
    assert sorted(got) == sorted(set(ids) - lost)  # everything else streamed, nothing twice
    assert stream.errors == {"tar": 1, "json": 1, "missing": 1, "image": 1, "text": 0}
    assert stream.error_count == 4
    assert stream.decoded == 12


def test_missing_shard_fails_naming_it(tmp_path):
    _write(tmp_path / "d", [3])
    with pytest.raises(FileNotFoundError, match="shard-000009.tar"):
        make_dataset([str(tmp_path / "d" / "shard-000000.tar"), str(tmp_path / "d" / "shard-000009.tar")], "pair")
    with pytest.raises(FileNotFoundError, match="shard-000001.tar"):
        make_dataset(str(tmp_path / "d" / "shard-00000{0..1}.tar"), "pair")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_dataset(tmp_path / "nowhere", "pair")
    with pytest.raises(ValueError, match="kind 'pair'"):
        make_dataset(tmp_path / "d", "triplet")


# ----------------------------------------------------------------------------- splitting, epochs


def test_workers_partition_a_finite_epoch(tmp_path):
    ids = _write(tmp_path / "d", [5, 4, 3])
    for nw in (0, 2):
        stream = make_dataset(tmp_path / "d", "pair", resampled=False, shuffle_buffer=4, batch_size=2)
        got = _ids(StreamLoader(stream, num_workers=nw))
        assert sorted(got) == sorted(ids), nw  # each sample exactly once
    # fewer shards than slots: every slot reads the shard and keeps every n-th sample
    _write(tmp_path / "one", [7], prefix="o")
    parts = [_ids(make_dataset(tmp_path / "one", "pair", resampled=False, rank=r, world_size=3,
                               equal_steps=False, shuffle_buffer=0)) for r in range(3)]
    assert sorted(sum(parts, [])) == [f"o{i}" for i in range(7)]
    assert [len(p) for p in parts] == [3, 2, 2]


def test_shuffle_changes_per_epoch_and_is_reproducible(tmp_path):
    _write(tmp_path / "d", [10, 10, 10])

    def epoch_ids(seed: int, epoch: int) -> list[str]:
        s = make_dataset(tmp_path / "d", "pair", resampled=False, shuffle_buffer=8, seed=seed)
        s.set_epoch(epoch)
        return _ids(StreamLoader(s))

    e0, e1 = epoch_ids(0, 0), epoch_ids(0, 1)
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert epoch_ids(0, 0) == e0 and epoch_ids(0, 1) == e1
    assert epoch_ids(1, 0) != e0
    # a loader moves to the next epoch by itself
    s = make_dataset(tmp_path / "d", "pair", resampled=False, shuffle_buffer=8, seed=0)
    loader = StreamLoader(s)
    assert _ids(loader) == e0 and _ids(loader) == e1 and s.epoch == 2


def test_resampled_epoch_has_fixed_steps(tmp_path):
    _write(tmp_path / "d", [7, 3])
    s = make_dataset(tmp_path / "d", "pair", batch_size=3, shuffle_buffer=5)
    assert len(s) == 10 // 3
    items = list(StreamLoader(s, num_workers=2))
    assert len(items) == 3 and all(len(b["id"]) == 3 for b in items) and s.epoch == 1
    s2 = make_dataset(tmp_path / "d", "pair", batch_size=2, steps_per_epoch=7)
    assert len(list(StreamLoader(s2))) == 7


def test_mixing_follows_weights(tmp_path):
    _write(tmp_path / "a", [20, 20], prefix="a")
    _write(tmp_path / "b", [20, 20], prefix="b")
    s = make_dataset([tmp_path / "a", tmp_path / "b"], "pair", weights=[3.0, 1.0], shuffle_buffer=50,
                     batch_size=10, steps_per_epoch=60)
    got = _ids(StreamLoader(s))
    share = sum(i.startswith("a") for i in got) / len(got)
    assert len(got) == 600 and abs(share - 0.75) < 0.05
    with pytest.raises(ValueError, match="one source per weight"):
        make_dataset(tmp_path / "a", "pair", weights=[1.0])


def test_collate_stacks_tensors_and_lists_the_rest():
    samples = [{"x": torch.full((2, 3), float(i)), "t": f"t{i}", "l": [i]} for i in range(3)]
    samples[2]["extra"] = 1
    b = collate(samples)
    assert b["x"].shape == (3, 2, 3) and torch.equal(b["x"][2], torch.full((2, 3), 2.0))
    assert b["t"] == ["t0", "t1", "t2"] and b["l"] == [[0], [1], [2]] and b["extra"] == [None, None, 1]


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_without_replay(tmp_path, num_workers):
    _write(tmp_path / "d", [9, 8, 7, 6])

    def stream() -> ShardStream:
        return make_dataset(tmp_path / "d", "pair", batch_size=3, steps_per_epoch=7, shuffle_buffer=6, seed=5)

    ref_stream = stream()
    ref_loader = StreamLoader(ref_stream, num_workers=num_workers)
    reference = [_ids([b]) for b in ref_loader] + [_ids([b]) for b in ref_loader]  # epochs 0 and 1
    assert len(reference) == 14

    first = stream()
    loader = StreamLoader(first, num_workers=num_workers)
    taken = []
    for b in loader:
        taken.append(_ids([b]))
        if len(taken) == 5:
            break
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint (plain types)
    assert taken == reference[:5]

    resumed = stream()
    resumed.load_state_dict(state)
    loader = StreamLoader(resumed, num_workers=num_workers)
    after = [_ids([b]) for b in loader] + [_ids([b]) for b in loader]
    assert after == reference[5:]
    # skipped samples were not decoded: exactly the 9 remaining batches of 3
    assert resumed.decoded == 9 * 3


# ----------------------------------------------------------------------------- two real processes


def _ddp_worker(rank: int, world: int, folder: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}.init", rank=rank, world_size=world)
    result = {}
    for mode in ("finite", "resampled"):
        s = make_dataset(folder, "pair", resampled=mode == "resampled", batch_size=4, shuffle_buffer=8, seed=3)
        steps, ids = 0, []
        for batch in StreamLoader(s, num_workers=1):
            t = torch.ones(1)
            dist.all_reduce(t)  # a collective per step, as DDP does: uneven steps would hang
            steps += 1
            ids += batch["id"]
        result[mode] = {"steps": steps, "ids": ids, "len": len(s), "rank": s.rank, "world": s.world_size}
    Path(f"{out}.{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_disjoint_and_equal_steps(tmp_path):
    counts = [9, 9, 9, 5, 5]  # 37 samples in 5 shards: ranks get 3 and 2 shards
    ids = _write(tmp_path / "d", counts)
    out = str(tmp_path / "res")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "d"), out), nprocs=2, join=True)
    res = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(2)]
    steps = sum(counts) // (2 * 4)
    for mode in ("finite", "resampled"):
        assert [r[mode]["steps"] for r in res] == [steps, steps], mode
        assert [r[mode]["rank"] for r in res] == [0, 1] and res[0][mode]["world"] == 2
        assert all(set(r[mode]["ids"]) <= set(ids) for r in res)
    a, b = set(res[0]["finite"]["ids"]), set(res[1]["finite"]["ids"])
    assert not a & b  # node splitting: disjoint shards per rank
    assert len(res[0]["finite"]["ids"]) == steps * 4


# ----------------------------------------------------------------------------- DataModule + Lightning


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255


def test_datamodule_loader_and_transform(tmp_path):
    from cirlab.data.datamodules import ShardDataModule

    _write(tmp_path / "d", [6, 5])
    dm = ShardDataModule(str(tmp_path / "d"), "pair", batch_size=4, num_workers=0, shuffle_buffer=4,
                         val=str(tmp_path / "d"))
    dm.set_transforms(_to_tensor, _to_tensor)
    dl = dm.train_dataloader()
    assert len(dl) == 11 // 4
    batch = dm.on_before_batch_transfer(next(iter(dl)), 0)
    assert batch["image"].shape == (4, 3, 8, 8) and len(batch["text"]) == 4 and "__stream__" not in batch
    assert dm.state_dict()["train"]["items"] == 1
    val = [dm.on_before_batch_transfer(b, 0) for b in dm.val_dataloader()]
    assert sum(len(b["id"]) for b in val) == 11  # validation: finite, every sample once


def test_loaders_hand_out_the_streams_batches_as_they_are(tmp_path, small_world, monkeypatch):
    """The streams batch themselves: none of their loaders may run DataLoader's `batch_size=None`
    default, `default_convert`, which walks each batch (the stream snapshot's thousands of entries
    included) in the training process when there are no workers."""
    import torch.utils.data.dataloader as dataloader
    from cirlab.data.datamodules import ShardDataModule
    from cirlab.data.retrieval import RetrievalDataModule

    walked = []
    real = dataloader._utils.collate.default_convert
    monkeypatch.setattr(dataloader._utils.collate, "default_convert", lambda b: walked.append(b) or real(b))
    _write(tmp_path / "d", [6, 5])
    dm = ShardDataModule(str(tmp_path / "d"), "pair", batch_size=4, num_workers=0, shuffle_buffer=4,
                         val=str(tmp_path / "d"))
    dm.set_transforms(_to_tensor, _to_tensor)
    train = [dm.on_before_batch_transfer(b, 0) for b in dm.train_dataloader()]
    val = list(dm.val_dataloader())
    streamed = list(StreamLoader(ShardStream(str(tmp_path / "d"), "pair", batch_size=4, resampled=False)))
    evals = RetrievalDataModule(val_sets=[str(small_world.path("eval/val"))], eval_batch_size=16)
    evals.set_transforms(_to_tensor)
    gallery = [b for loader in evals.val_dataloader() for b in loader]
    assert walked == []
    # and the batches are still whole: images stacked, every sample once
    assert train[0]["image"].shape == (4, 3, 8, 8) and sum(len(b["id"]) for b in val) == 11
    assert sum(len(b["id"]) for b in streamed) == 11
    assert gallery and all(b["image"].shape[1:] == (3, 64, 64) for b in gallery)


@pytest.mark.slow
def test_lightning_checkpoint_resumes_the_stream(tmp_path):
    import lightning.pytorch as pl

    from cirlab.data.datamodules import ShardDataModule

    _write(tmp_path / "d", [7, 6, 5])

    class Recorder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[str]] = []

        def setup(self, stage: str) -> None:
            self.trainer.datamodule.set_transforms(_to_tensor, _to_tensor)

        def training_step(self, batch, batch_idx):
            self.seen.append(list(batch["id"]))
            return (self.w - batch["image"].mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def run(max_steps: int, ckpt: str | None = None, save: str | None = None) -> list[list[str]]:
        dm = ShardDataModule(str(tmp_path / "d"), "pair", batch_size=3, num_workers=0, steps_per_epoch=4,
                             shuffle_buffer=5, seed=2)
        model = Recorder()
        trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(model, dm, ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return model.seen

    reference = run(7)
    first = run(3, save=str(tmp_path / "mid.ckpt"))
    assert first == reference[:3]
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    assert ckpt["ShardDataModule"]["train"]["items"] == 3
    assert run(7, ckpt=str(tmp_path / "mid.ckpt")) == reference[3:]  # crosses into epoch 1, no replay


def test_prepare_runs_on_each_batch_before_collation(tmp_path):
    ids = _write(tmp_path / "p", [5, 4])
    sizes = []

    def tag(samples):
        sizes.append(len(samples))
        return [dict(s, tag=s["id"].upper()) for s in samples]

    stream = ShardStream(tmp_path / "p", "pair", resampled=False, shuffle=False, batch_size=4, rank=0,
                         world_size=1, equal_steps=False, prepare=tag)
    batches = list(stream)
    assert sizes == [4, 4, 1]  # whole batches, then the partial last one
    assert [t for b in batches for t in b["tag"]] == [i.upper() for i in ids]
    single = ShardStream(tmp_path / "p", "pair", resampled=False, shuffle=False, rank=0, world_size=1,
                         equal_steps=False, prepare=tag)
    assert [s["tag"] for s in single] == [i.upper() for i in ids]


# ----------------------------------------------------------------------------- resume by (shard, offset)


def _take(stream: ShardStream, n: int, num_workers: int = 0) -> list[list[str]]:
    out = []
    for b in StreamLoader(stream, num_workers=num_workers):
        out.append(_ids([b]))
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("mode", ["finite", "mixed"])
def test_resume_exact_in_finite_and_mixed_streams(tmp_path, mode):
    _write(tmp_path / "a", [9, 8, 7, 6], prefix="a")
    _write(tmp_path / "b", [5, 5, 5], prefix="b")

    def stream() -> ShardStream:
        if mode == "finite":
            return make_dataset(tmp_path / "a", "pair", resampled=False, batch_size=3, shuffle_buffer=6, seed=1)
        return make_dataset([tmp_path / "a", tmp_path / "b"], "pair", weights=[2.0, 1.0], batch_size=3,
                            steps_per_epoch=9, shuffle_buffer=6, seed=1)

    ref_loader = StreamLoader(stream())
    reference = [_ids([b]) for b in ref_loader] + [_ids([b]) for b in ref_loader]
    first = stream()
    assert _take(first, 4) == reference[:4]
    resumed = stream()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    loader = StreamLoader(resumed)
    assert [_ids([b]) for b in loader] + [_ids([b]) for b in loader] == reference[4:]


@pytest.mark.parametrize("resampled", [False, True])
def test_resume_opens_the_current_shards_only(tmp_path, resampled):
    """Late and early positions cost the same: finished shards are skipped unopened."""
    _write(tmp_path / "d", [10] * 30)

    def stream() -> ShardStream:
        return make_dataset(tmp_path / "d", "pair", resampled=resampled, batch_size=5, shuffle_buffer=8, seed=4,
                            steps_per_epoch=60)

    reference = [_ids([b]) for b in StreamLoader(stream())]
    opened = {}
    for at in (6, 54):  # 10 % and 90 % of the epoch
        first = stream()
        assert _take(first, at) == reference[:at]
        resumed = stream()
        resumed.load_state_dict(first.state_dict())
        assert _take(resumed, 1) == reference[at:at + 1]
        opened[at] = resumed.shards_opened
    # the buffer's 8 samples lie in a few shards of 10, plus the shard being read and the next one
    # for the batch (a re-read of the past would open 4 and 28 shards)
    assert opened[6] <= 6 and opened[54] <= 6, opened


def _drain(stream: ShardStream, num_workers: int = 0) -> list[str]:
    return _ids(StreamLoader(stream, num_workers=num_workers))


@pytest.mark.parametrize("before,after", [(0, 2), (2, 0), (2, 3)])
def test_resume_with_other_num_workers_reads_each_sample_once(tmp_path, before, after):
    ids = _write(tmp_path / "d", [9, 8, 7, 6, 5, 4])

    def stream() -> ShardStream:
        return make_dataset(tmp_path / "d", "pair", resampled=False, batch_size=3, shuffle_buffer=5, seed=2)

    first = stream()
    taken = sum(_take(first, 4, num_workers=before), [])
    resumed = stream()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = _drain(resumed, num_workers=after)
    assert sorted(taken + rest) == sorted(ids)  # no sample replayed, none skipped; order differs


def test_resume_on_fewer_ranks_continues_the_unread_shards(tmp_path, caplog):
    ids = _write(tmp_path / "d", [6] * 8)

    def stream(rank: int, world: int) -> ShardStream:
        return make_dataset(tmp_path / "d", "pair", resampled=False, batch_size=2, shuffle_buffer=4, seed=3,
                            rank=rank, world_size=world, equal_steps=False)

    taken, ranks = [], {}
    for r in range(2):  # two ranks, each 5 batches in
        s = stream(r, 2)
        taken += sum(_take(s, 5), [])
        ranks[str(r)] = s.state_dict()["ranks"][str(r)]
    state = dict(ranks["0"], ranks=ranks)
    one = stream(0, 1)
    with caplog.at_level("WARNING"):
        one.load_state_dict(json.loads(json.dumps(state)))
        rest = _drain(one)
    assert "order differs" in caplog.text
    assert sorted(taken + rest) == sorted(ids)
    # and onto more ranks: their shares are disjoint and together the unread rest
    parts = []
    for r in range(3):
        s = stream(r, 3)
        s.load_state_dict(json.loads(json.dumps(state)))
        parts.append(_drain(s))
    assert sorted(taken + sum(parts, [])) == sorted(ids)


def test_empty_shard_set_is_one_clear_error(tmp_path):
    from cirlab.data.shards import INDEX_NAME, ShardIndex
    from cirlab.errors import CirlabError

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / INDEX_NAME).write_text(json.dumps(ShardIndex("pair", [], [], tmp_path / "empty").to_json()))
    for resampled in (True, False):
        with pytest.raises(CirlabError, match=r"empty.*0 samples") as err:
            make_dataset(tmp_path / "empty", "pair", resampled=resampled, batch_size=2)
        assert str(tmp_path / "empty") in str(err.value)


def test_truncated_shard_warns_once_then_counts(tmp_path, caplog):
    _write(tmp_path / "d", [6, 6])
    d = tmp_path / "d"
    with tarfile.open(d / "shard-000001.tar") as tf:
        cut = tf.getmember(f"{3:010d}.png").offset_data + 5
    with open(d / "shard-000001.tar", "r+b") as f:
        f.truncate(cut)
    # 9 samples readable; 20 steps of 2 read the truncated shard 4-5 times (passes)
    s = make_dataset(d, "pair", resampled=False, batch_size=2, steps_per_epoch=20, shuffle_buffer=0)
    with caplog.at_level("WARNING", logger="cirlab.data.streaming"):
        assert len(_drain(s)) == 40
    lines = [r.getMessage() for r in caplog.records]
    assert sum("shard-000001.tar" in m for m in lines) == 1, lines
    assert s.errors["tar"] >= 4
    assert any(f"{s.errors['tar'] - 1} more skipped" in m for m in lines), lines


def test_buffer_larger_than_the_data_still_reads_each_sample_once_per_pass(tmp_path):
    ids = _write(tmp_path / "d", [4] * 6)  # 24 samples; buffer 1000; 3 passes of 8 batches... of 3
    s = make_dataset(tmp_path / "d", "pair", resampled=False, batch_size=3, shuffle_buffer=1000, seed=0,
                     steps_per_epoch=24)
    got = _drain(s)
    for k in range(3):  # passes are drained one by one: each a permutation of the data
        assert sorted(got[24 * k:24 * (k + 1)]) == sorted(ids), k
    assert got[:24] != ids and got[:24] != got[24:48]  # shuffled, and reshuffled per pass


def test_augmentation_does_not_depend_on_the_folder(tmp_path):
    """The same shards in two folders give the same random crops: a run's numbers must not change
    with where its data (or the demo's --out folder) lies. Different epochs still crop differently."""
    import shutil

    _write(tmp_path / "a" / "pairs", [5, 4])
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")

    def crop(img):  # a random transform that draws from torch's generator
        x = torch.from_numpy(np.asarray(img, dtype=np.float32))
        return x + torch.rand(())

    def pixels(folder, epoch=0):
        stream = ShardStream(folder, "pair", transform=crop, resampled=False, shuffle=False, shuffle_buffer=0,
                             batch_size=None, rank=0, world_size=1, equal_steps=False)
        stream.set_epoch(epoch)
        return {s["id"]: s["image"] for s in stream}

    a, b = pixels(tmp_path / "a" / "pairs"), pixels(tmp_path / "elsewhere" / "b" / "pairs")
    assert a.keys() == b.keys() and len(a) == 9
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    other = pixels(tmp_path / "a" / "pairs", epoch=1)
    assert any(not torch.equal(a[k], other[k]) for k in a)


def test_batched_transform_crops_each_sample_alike_in_any_batch(tmp_path):
    """A batched transform (models/transforms.py) draws each sample's crop from the sample's own seed
    and does the pixel work per batch: a sample's crop must not depend on its batch mates or the
    batch size (resume and worker layouts rely on it); another epoch crops anew."""
    from cirlab.models.transforms import BatchedRandomResizedCrop

    _write(tmp_path / "pairs", [5, 4])
    t = BatchedRandomResizedCrop(6, scale=(0.3, 0.6))

    def crops(batch_size, epoch=0):
        stream = ShardStream(tmp_path / "pairs", "pair", transform=t, resampled=False, shuffle=False,
                             shuffle_buffer=0, batch_size=batch_size, rank=0, world_size=1, equal_steps=False)
        stream.set_epoch(epoch)
        out = {}
        for item in stream:
            ids = item["id"] if batch_size else [item["id"]]
            images = item["image"] if batch_size else item["image"][None]
            out.update(zip(ids, images))
        return out

    one, four = crops(None), crops(4)
    assert len(one) == 9 and one.keys() == four.keys()
    for k in one:
        assert one[k].shape == (3, 6, 6) and one[k].dtype == torch.float32
        torch.testing.assert_close(one[k], four[k], rtol=0, atol=0)
    other = crops(4, epoch=1)
    assert any(not torch.equal(four[k], other[k]) for k in four)


def test_decode_pixels_equals_pil_and_reports_broken_jpegs():
    """JPEGs decode through torchvision to the same pixels as PIL; PNGs through PIL; a truncated
    JPEG is a DecodeError, not a partial image."""
    from cirlab.data.streaming import DecodeError, decode_pixels

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))
    grey = Image.fromarray(rng.integers(0, 255, (24, 40), dtype=np.uint8))
    for im, fmt in ((img, "JPEG"), (grey, "JPEG"), (img, "PNG")):
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        data = buf.getvalue()
        want = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
        got = decode_pixels(data)
        assert got.dtype == torch.uint8 and torch.equal(got, want), fmt
    with pytest.raises(DecodeError, match="undecodable image"):
        decode_pixels(data[:0] + b"\xff\xd8\xff" + b"\x00" * 40)
