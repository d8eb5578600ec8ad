"""Run by tests/test_ddp.py: the CLIP pair task under Lightning DDP, 2 CPU processes (gloo)."""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from cirlab.data.retrieval import RetrievalDataModule
from cirlab.train.clip_task import CLIPTask
from cirlab.train.config import BackboneConfig, OptimizerConfig


class Record(L.Callback):
    def __init__(self, out):
        self.out, self.ids, self.steps = Path(out), [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ids.extend(batch["id"])
        self.steps += 1

    def on_train_end(self, trainer, pl_module):
        w = next(pl_module.parameters()).detach().flatten()[:8].tolist()
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"ids": self.ids, "steps": self.steps, "world": trainer.world_size, "weights": w,
             "val": pl_module.last_results.get("pairs", {})}))


if __name__ == "__main__":
    shards, out, val = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    task = CLIPTask(backbone=BackboneConfig("cirlab-tiny"), optimizer=OptimizerConfig("adamw", lr=1e-3))
    # finite, not resampled: every sample once per epoch, split between the ranks
    dm = RetrievalDataModule(train=shards, kind="pair", batch_size=16, resampled=False, num_workers=0,
                             shuffle_buffer=0, val=val, val_kind="pair", eval_batch_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Record(out)], num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
