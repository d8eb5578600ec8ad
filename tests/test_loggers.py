"""Loggers selectable from a recipe: CSV (default), wandb offline, TensorBoard."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from cirlab.data.retrieval import RetrievalDataModule
from cirlab.train.clip_task import CLIPTask
from cirlab.train.config import BackboneConfig


@pytest.mark.parametrize("kind", ["csv", "wandb", "tensorboard"])
def test_training_logs_through_each_logger(kind, small_world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = {"csv": lambda: CSVLogger(tmp_path, name="run"),
              "wandb": lambda: WandbLogger(save_dir=str(tmp_path), offline=True, project="cirlab-test"),
              "tensorboard": lambda: TensorBoardLogger(tmp_path, name="run")}[kind]()
    task = CLIPTask(backbone=BackboneConfig("cirlab-tiny"))
    dm = RetrievalDataModule(train=str(small_world.path("pairs")), kind="pair", batch_size=16, steps_per_epoch=2,
                             num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=logger, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    if kind == "wandb":
        import wandb

        wandb.finish()
        files = list(tmp_path.rglob("*.wandb"))
    elif kind == "tensorboard":
        files = list(tmp_path.rglob("events.out.tfevents.*"))
    else:
        files = [p for p in tmp_path.rglob("metrics.csv") if "train/loss" in p.read_text()]
    assert files, f"{kind} wrote no log"
    assert list(tmp_path.rglob("export/backbone.safetensors")), "fit end exports the weights beside the log"
