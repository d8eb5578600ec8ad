"""Run by tests/test_strategies.py as 2 processes (RANK/WORLD_SIZE set by the test, so Lightning
starts no others): the CLIP pair task fitted under ddp, then under FSDP (`cirlab_fsdp`: sharded
checkpoint folders; then `state_dict_type="full"`: one gathered file), in the same processes (one
start-up for all).

Then FocalLens under FSDP (export checked against the gathered weights only), and the SLURM
requeue's path under FSDP without a SLURM (`requeue_under_fsdp`: the preemption checkpoint is a
sharded folder, the resume from "hpc" continues exactly).

argv: synthetic world folder, output folder. Writes <strategy>-rank<r>.json (that rank's losses, the selected
checkpoint), and on rank 0 <strategy>-init.pt (the initial backbone) and <strategy>-full.pt: the
weights as the strategy itself gathers them after fit (torch FSDP's FULL_STATE_DICT, or the DDP
module's state dict), the reference for the export.
"""

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from cirlab.data.retrieval import RetrievalDataModule
from cirlab.train.clip_task import CLIPTask
from cirlab.train.config import BackboneConfig, OptimizerConfig, SchedulerConfig
from cirlab.train.slurm import SlurmRequeue
from cirlab.train.strategies import FSDPStrategy


class Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def full_state_dict(trainer: L.Trainer) -> dict:
    model = trainer.strategy.model
    if isinstance(trainer.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            return model.state_dict()  # a collective: every rank calls it
    return trainer.lightning_module.state_dict()


def fit(world: Path, out: Path, which: str) -> None:
    torch.manual_seed(0)
    # weight decay with no decay on biases/norms: the parameter groups must not depend on sharding
    opt = OptimizerConfig("adamw", lr=1e-3, weight_decay=0.1, no_decay_on_bias_and_norm=True)
    if which == "fsdp_focallens":  # reads the vision tower's pieces one by one (models/focallens.py)
        from cirlab.train.focallens_task import FocalLensTask

        task = FocalLensTask(backbone=BackboneConfig("cirlab-tiny", freeze_text=True), optimizer=opt,
                             scheduler=SchedulerConfig("constant"))
        shards, kind = world / "instructions", "instruction"
    else:
        task = CLIPTask(backbone=BackboneConfig("cirlab-tiny"), optimizer=opt, scheduler=SchedulerConfig("constant"))
        shards, kind = world / "pairs", "pair"
    dm = RetrievalDataModule(train=str(shards), kind=kind, batch_size=8, resampled=False, num_workers=0,
                             shuffle_buffer=0)
    # "fsdp": the name a recipe gives trainer.strategy (sharded folders); "fsdp_full": one gathered file
    strategy = {"fsdp": "cirlab_fsdp", "fsdp_full": FSDPStrategy(state_dict_type="full"),
                "fsdp_focallens": "cirlab_fsdp"}.get(which, "ddp")
    torch.save(task.backbone.merged_state_dict(), out / f"{which}-init.pt")
    rec = Losses()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3, max_epochs=1,
                        logger=CSVLogger(out, name=which, version=0), limit_val_batches=0, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[rec])
    trainer.fit(task, datamodule=dm)
    (out / f"{which}-rank{trainer.global_rank}.json").write_text(json.dumps(
        {"losses": rec.losses, "best": trainer.checkpoint_callback.best_model_path}))
    full = full_state_dict(trainer)
    if trainer.global_rank == 0:
        torch.save({k: v.detach().cpu() for k, v in full.items()}, out / f"{which}-full.pt")


class StepLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


class SignalAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)


class StopAfterCheckpoint(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if list(Path(trainer.default_root_dir).glob("hpc_ckpt_*")):
            trainer.should_stop = True


def fit_requeue(world: Path, root: Path, name: str, callbacks: list, ckpt_path=None) -> StepLosses:
    torch.manual_seed(0)
    task = CLIPTask(backbone=BackboneConfig("cirlab-tiny"), optimizer=OptimizerConfig("adamw", lr=1e-3),
                    scheduler=SchedulerConfig("constant"))
    dm = RetrievalDataModule(train=str(world / "pairs"), kind="pair", batch_size=8, resampled=False,
                             num_workers=0)
    rec = StepLosses()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="cirlab_fsdp", max_epochs=2,
                        logger=CSVLogger(root, name=name, version=0), default_root_dir=str(root / name),
                        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[SlurmRequeue(requeue=False), rec, *callbacks])
    trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    return rec


def requeue_under_fsdp(world: Path, out: Path) -> None:
    """Uninterrupted; signalled at step 2 (rank 0 only: the ranks agree by all-reduce) and stopped after
    the preemption checkpoint; resumed from "hpc". Rank 0 writes requeue.json."""
    out = out / "requeue"
    os.environ["SLURM_JOB_ID"] = "77"  # SlurmRequeue acts inside a SLURM job only
    reference = fit_requeue(world, out, "reference", [])
    preempted = fit_requeue(world, out, "job", [SignalAt(1), StopAfterCheckpoint()])
    (ckpt,) = (out / "job").glob("hpc_ckpt_*")
    resumed = fit_requeue(world, out, "job", [], ckpt_path="hpc")
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "requeue.json").write_text(json.dumps({
            "reference": reference.losses, "preempted": preempted.losses, "resumed": resumed.losses,
            "folder": ckpt.is_dir(), "parts": len(list(ckpt.glob("*.distcp")))}))


if __name__ == "__main__":
    for which in ("ddp", "fsdp", "fsdp_full", "fsdp_focallens"):
        fit(Path(sys.argv[1]), Path(sys.argv[2]), which)
    requeue_under_fsdp(Path(sys.argv[1]), Path(sys.argv[2]))
