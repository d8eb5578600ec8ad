"""Run by tests/test_strategies.py as 2 processes (RANK/WORLD_SIZE set by the test, so Lightning
starts no others): the CLIP pair task fitted under ddp, then under FSDP (`cirlab_fsdp`: sharded
checkpoint folders; then `state_dict_type="full"`: one gathered file), in the same processes (one
start-up for all).

argv: pair shards, output folder. Writes <strategy>-rank<r>.json (that rank's losses, the selected
checkpoint), and on rank 0 <strategy>-init.pt (the initial backbone) and <strategy>-full.pt: the
weights as the strategy itself gathers them after fit (torch FSDP's FULL_STATE_DICT, or the DDP
module's state dict), the reference for the export.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from cirlab.data.retrieval import RetrievalDataModule
from cirlab.train.clip_task import CLIPTask
from cirlab.train.config import BackboneConfig, OptimizerConfig, SchedulerConfig
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


def fit(shards: str, out: Path, which: str) -> None:
    torch.manual_seed(0)
    # weight decay with no decay on biases/norms: the parameter groups must not depend on sharding
    task = CLIPTask(backbone=BackboneConfig("cirlab-tiny"),
                    optimizer=OptimizerConfig("adamw", lr=1e-3, weight_decay=0.1, no_decay_on_bias_and_norm=True),
                    scheduler=SchedulerConfig("constant"))
    dm = RetrievalDataModule(train=shards, kind="pair", batch_size=8, resampled=False, num_workers=0,
                             shuffle_buffer=0)
    # "fsdp": the name a recipe gives trainer.strategy (sharded folders); "fsdp_full": one gathered file
    strategy = {"fsdp": "cirlab_fsdp", "fsdp_full": FSDPStrategy(state_dict_type="full")}.get(which, "ddp")
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


if __name__ == "__main__":
    for which in ("ddp", "fsdp", "fsdp_full"):
        fit(sys.argv[1], Path(sys.argv[2]), which)
