"""A preempted run resumed from its checkpoint, through the SLURM requeue's own code path
(SlurmRequeue: the signal, the checkpoint at a step boundary, Lightning's "hpc" resume) without a
SLURM: with dropout it ends bit-identical to an uninterrupted run (the global random states travel
in the checkpoint), and wandb (offline, real) continues the same run id."""

from __future__ import annotations

import os
import signal
import struct
from pathlib import Path

import lightning as L
import pytest
import torch

from cirlab.train.combiner_task import CombinerConfig, CombinerTask
from cirlab.train.config import BackboneConfig, OptimizerConfig
from cirlab.train.slurm import SlurmRequeue

JOB = "4242"


@pytest.fixture(scope="module")
def triplets(tmp_path_factory):
    from cirlab.data.synthetic import build_world

    root = tmp_path_factory.mktemp("resumeworld") / "world"
    build_world(root, seed=0, n_train_scenes=24, n_eval_queries=8, renders_per_scene=1, shard_size=4,
                n_triplets=24, n_texts=4, instructions_per_scene=1)
    return root / "triplets" / "train"


class SignalAt(L.Callback):
    """Sends this process the requeue signal while step `step` runs (as SLURM's --signal does)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


class StopAfterCheckpoint(L.Callback):
    """The preempted job: it stops once the preemption checkpoint is written (SLURM would kill it)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if list(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")):
            trainer.should_stop = True


class Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append((trainer.global_step, float(outputs["loss"])))


def _task(cache: Path) -> CombinerTask:
    torch.manual_seed(0)  # the same initial weights in every run
    return CombinerTask(stage=2, backbone=BackboneConfig("cirlab-tiny", image_transform="clip"),
                        combiner=CombinerConfig(dropout=0.5), optimizer=OptimizerConfig("adam", lr=1e-3),
                        cache_dir=str(cache))


def _fit(triplets: Path, root: Path, cache: Path, callbacks: list, ckpt_path=None, logger=False,
         seed: int = 0) -> CombinerTask:
    from cirlab.data.retrieval import RetrievalDataModule

    task = _task(cache)
    dm = RetrievalDataModule(train=str(triplets), kind="triplet", batch_size=4, resampled=False, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=logger, enable_checkpointing=False,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, default_root_dir=str(root),
                        callbacks=[SlurmRequeue(requeue=False), *callbacks])
    torch.manual_seed(seed)  # a resumed job starts from other global random states than the checkpoint's
    trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    return task


def _combiner(task: CombinerTask) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.combiner.state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("signal_step, saved_at", [(2, 3), (5, 7)], ids=["mid-epoch", "epoch-last-step"])
def test_resumed_run_with_dropout_equals_the_uninterrupted_run(triplets, tmp_path, monkeypatch, signal_step,
                                                               saved_at):
    monkeypatch.setenv("SLURM_JOB_ID", JOB)  # SlurmRequeue acts inside a SLURM job only
    cache = tmp_path / "cache"
    ref_losses = Losses()
    reference = _combiner(_fit(triplets, tmp_path / "ref", cache, [ref_losses]))  # 2 epochs x 6 steps
    assert len(ref_losses.losses) == 12
    _fit(triplets, tmp_path / "job", cache, [SignalAt(signal_step), StopAfterCheckpoint()])
    (ckpt,) = (tmp_path / "job").glob("hpc_ckpt_*.ckpt")
    saved = torch.load(ckpt, weights_only=True)  # still plain data
    # at the step boundary after the signal; at an epoch's last step, one step later
    assert saved["global_step"] == saved_at
    assert saved["callbacks"]["SlurmRequeue"]["rng"][0]["torch"].dtype == torch.uint8
    losses = Losses()
    resumed = _fit(triplets, tmp_path / "job", cache, [losses], ckpt_path="hpc", seed=123)
    assert [s for s, _ in losses.losses] == list(range(saved_at + 1, 13))
    assert [x for _, x in losses.losses] == pytest.approx([x for _, x in ref_losses.losses[saved_at:]], abs=1e-6)
    assert _max_diff(_combiner(resumed), reference) <= 1e-6
    # the control: the same resume without the random states draws other dropout masks
    del saved["callbacks"]["SlurmRequeue"]
    torch.save(saved, tmp_path / "no-rng.ckpt")
    control = _fit(triplets, tmp_path / "control", cache, [], ckpt_path=str(tmp_path / "no-rng.ckpt"), seed=123)
    assert _max_diff(_combiner(control), reference) > 1e-4


# ----------------------------------------------------------------------------- wandb


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's .wandb file (LevelDB log framing: 32 KiB blocks,
    7-byte record headers crc32/length/type, FULL=1 FIRST=2 MIDDLE=3 LAST=4, after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def _wandb_run(path: Path) -> tuple[str, list[int]]:
    """(run id, trainer/global_step of each history row) of one offline run file."""
    import json

    run_id, steps = None, []
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run" and run_id is None:
            run_id = rec.run.run_id
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
            if "train/loss" in items:
                steps.append(int(json.loads(items["trainer/global_step"])))
    return run_id, steps


def _wandb_run_when_written(path: Path, timeout: float = 30.0) -> tuple[str, list[int]]:
    """`_wandb_run` once the file holds its run record: wandb's service process may still be writing
    the file after `wandb.finish()` returns (seen once on a loaded machine: no run record yet)."""
    import time

    deadline = time.monotonic() + timeout
    while (found := _wandb_run(path))[0] is None and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


@pytest.mark.slow
def test_wandb_continues_the_same_run_after_a_requeue(triplets, tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("SLURM_JOB_ID", JOB)
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    run_dir = runs / "wandb" / f"slurm-{JOB}"  # what `cirlab slurm submit` passes as default_root_dir

    def logger() -> WandbLogger:  # as the sbatch script names it: the id is the job's
        return WandbLogger(save_dir=str(runs), project="cirlab-test", id=f"slurm-{JOB}", offline=True)

    _fit(triplets, run_dir, cache, [SignalAt(2), StopAfterCheckpoint()], logger=logger())
    wandb.finish()
    _fit(triplets, run_dir, cache, [], ckpt_path="hpc", logger=logger(), seed=1)
    wandb.finish()
    files = sorted((runs / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, files  # offline wandb writes one folder per process, both named by the run id
    (first_id, first), (second_id, second) = (_wandb_run_when_written(f) for f in files)
    assert first_id == second_id == f"slurm-{JOB}"
    assert all(f.name == f"run-slurm-{JOB}.wandb" for f in files)
    # the requeued job's rows continue after the preempted job's (Lightning's x-axis is the global step)
    assert first == [0, 1, 2] and second == list(range(3, 12)), (first, second)


@pytest.mark.slow
def test_cirlab_fit_ckpt_path_continues_the_wandb_run(tmp_path, monkeypatch):
    """Without SLURM (no id given): `cirlab fit --ckpt_path` takes the run id the checkpoint records."""
    import wandb

    from cirlab.data.synthetic import build_world
    from cirlab.train.cli import run_lightning

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "runs"))
    world = tmp_path / "world"
    build_world(world, seed=0, n_train_scenes=16, n_eval_queries=4, renders_per_scene=1, shard_size=8,
                n_triplets=2, n_texts=2, instructions_per_scene=1)
    args = ["fit", "-c", "quickstart/clip", "--trainer.accelerator=cpu", "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path / 'runs'}",
            f"--data.init_args.train={world}/pairs", f"--data.init_args.val={world}/pairs_val",
            "--data.init_args.num_workers=0", "--data.init_args.batch_size=8", "--data.init_args.steps_per_epoch=2",
            "--trainer.logger.class_path=lightning.pytorch.loggers.WandbLogger",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.logger.init_args.offline=true",
            "--trainer.logger.init_args.project=cirlab-test"]
    cli = run_lightning([*args, "--trainer.max_steps=2"])
    first_id = cli.trainer.logger.version
    ckpt = tmp_path / "stopped.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    wandb.finish()
    assert torch.load(ckpt, weights_only=True)["cirlab_wandb_id"] == first_id
    cli = run_lightning([*args, "--trainer.max_steps=4", f"--ckpt_path={ckpt}"])
    assert cli.trainer.global_step == 4
    second_id = cli.trainer.logger.version
    wandb.finish()
    files = sorted((tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    (id_a, steps_a), (id_b, steps_b) = (_wandb_run_when_written(f) for f in files)
    assert first_id == second_id == id_a == id_b
    assert steps_a == [0, 1] and steps_b == [2, 3], (steps_a, steps_b)


def test_only_a_wandb_logger_without_an_id_takes_the_checkpoints(tmp_path):
    from jsonargparse import Namespace

    from cirlab.train.resume import continue_wandb_run

    ckpt = tmp_path / "a.ckpt"
    torch.save({"state_dict": {}, "cirlab_wandb_id": "abc123"}, ckpt)

    def trainer(cls: str, **init_args) -> Namespace:
        return Namespace(logger=Namespace(class_path=cls, init_args=Namespace(id=None, version=None, **init_args)))

    free = trainer("lightning.pytorch.loggers.WandbLogger")
    assert continue_wandb_run(free, str(ckpt)) == "abc123" and free.logger.init_args.id == "abc123"
    named = trainer("lightning.pytorch.loggers.WandbLogger")
    named.logger.init_args.id = "slurm-7"  # a SLURM job names its run: kept
    assert continue_wandb_run(named, str(ckpt)) is None and named.logger.init_args.id == "slurm-7"
    csv = trainer("lightning.pytorch.loggers.CSVLogger")
    assert continue_wandb_run(csv, str(ckpt)) is None and csv.logger.init_args.id is None
    assert continue_wandb_run(trainer("lightning.pytorch.loggers.WandbLogger"), "last") is None
    torch.save({"state_dict": {}}, tmp_path / "old.ckpt")  # written before ids were recorded
    assert continue_wandb_run(trainer("lightning.pytorch.loggers.WandbLogger"), str(tmp_path / "old.ckpt")) is None


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from cirlab.train.rng_state import collect_rng_states, restore_rng_states

    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    torch.save({"rng": collect_rng_states()}, tmp_path / "s.ckpt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng_states(torch.load(tmp_path / "s.ckpt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
