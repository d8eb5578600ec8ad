"""CLIP4Cir task: the loss as the reference computes it, both stages end to end, the feature cache."""

from __future__ import annotations

import lightning as L
import pytest

from cirlab.errors import CirlabError
import torch
import torch.nn.functional as F

from cirlab.data.retrieval import RetrievalDataModule
from cirlab.train.combiner_task import CombinerTask, text_variants, training_text
from cirlab.train.config import BackboneConfig, OptimizerConfig


class LossLog(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(task, world, steps, batch=32, val=False, tmp_path=None):
    dm = RetrievalDataModule(train=str(world.path("triplets/train")), kind="triplet",
                             val_sets=[str(world.path("eval/val"))] if val else None,
                             batch_size=batch, steps_per_epoch=steps, num_workers=0, seed=0)
    log = LossLog()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[log],
                        limit_val_batches=1.0 if val else 0, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path) if tmp_path else None)
    trainer.fit(task, datamodule=dm)
    return log.losses


def test_loss_is_reference_cross_entropy_with_fixed_scale_100():
    task = CombinerTask(stage=1, backbone=BackboneConfig("cirlab-tiny"))
    torch.manual_seed(0)
    q = F.normalize(torch.randn(6, 64), dim=-1)
    t = torch.randn(6, 64) * 3
    expected = F.cross_entropy(100.0 * q @ F.normalize(t, dim=-1).T, torch.arange(6))
    assert torch.allclose(task.loss(q, t), expected, atol=1e-5)
    # the query is normalise(raw image + raw text) in stage 1
    ref, txt = torch.randn(2, 64), torch.randn(2, 64)
    assert torch.allclose(task.combine(ref, txt), F.normalize(ref + txt, dim=-1))
    assert not task.backbone.model.logit_scale.requires_grad


def test_reference_optimizer_defaults():
    s1 = CombinerTask(stage=1, backbone=BackboneConfig("cirlab-tiny"))
    o = s1.configure_optimizers()["optimizer"]
    assert isinstance(o, torch.optim.AdamW)
    g = o.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (2e-6, (0.9, 0.999), 1e-7, 0.01)
    s2 = CombinerTask(stage=2, backbone=BackboneConfig("cirlab-tiny"))
    o2 = s2.configure_optimizers()["optimizer"]
    assert type(o2) is torch.optim.Adam and o2.param_groups[0]["lr"] == 2e-5
    # stage 2 trains the Combiner only
    trainable = {n.split(".")[0] for n, p in s2.named_parameters() if p.requires_grad}
    assert trainable == {"combiner"}
    # P = 4D, H = 8D by default
    assert s2.combiner.projection_dim == 256 and s2.combiner.hidden_dim == 512


def test_train_towers_key():
    t = CombinerTask(stage=1, train_towers="text", backbone=BackboneConfig("cirlab-tiny"))
    assert not any(p.requires_grad for p in t.backbone.image_parameters())
    assert all(p.requires_grad for p in t.backbone.text_parameters())
    with pytest.raises(ValueError, match="train_towers"):
        CombinerTask(stage=1, train_towers="vision", backbone=BackboneConfig("cirlab-tiny"))


def test_fashioniq_training_texts_cover_the_four_joins():
    import random

    rng = random.Random(0)
    seen = {training_text(["is red.", "has long sleeves"], "fashioniq", rng) for _ in range(200)}
    assert seen == set(text_variants(["is red.", "has long sleeves"], "fashioniq"))
    assert len(seen) == 4


def test_backbone_stays_in_eval_mode_frozen_batchnorm(small_world):
    task = CombinerTask(stage=1, backbone=BackboneConfig("cirlab-tiny-rn", image_transform="targetpad"),
                        optimizer=OptimizerConfig("adamw", lr=1e-3))
    bns = [m for m in task.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    before = [m.running_mean.clone() for m in bns]
    _fit(task, small_world, steps=2, batch=8)
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns))


def test_stage1_end_to_end_loss_decreases(small_world):
    torch.manual_seed(0)
    task = CombinerTask(stage=1, backbone=BackboneConfig("cirlab-tiny", image_transform="targetpad"),
                        optimizer=OptimizerConfig("adamw", lr=1e-3))
    losses = _fit(task, small_world, steps=24, batch=32)
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2


def test_stage2_uses_the_cache_and_never_runs_the_image_tower_after(small_world, tmp_path):
    torch.manual_seed(0)
    task = CombinerTask(stage=2, backbone=BackboneConfig("cirlab-tiny", image_transform="targetpad"),
                        optimizer=OptimizerConfig("adam", lr=1e-3), cache_dir=str(tmp_path / "cache"))
    calls = {"fill": 0, "train": 0}
    phase = {"now": "fill"}
    task.backbone.model.visual.register_forward_hook(lambda *a: calls.__setitem__(phase["now"], calls[phase["now"]] + 1))

    class Phase(L.Callback):
        def on_train_start(self, trainer, pl_module):
            phase["now"] = "train"

    dm = RetrievalDataModule(train=str(small_world.path("triplets/train")), kind="triplet", batch_size=64,
                             steps_per_epoch=20, num_workers=0)
    log = LossLog()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[log, Phase()],
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    assert calls["fill"] > 0 and calls["train"] == 0
    assert not dm.decode_images  # training batches carry no pixels
    assert sum(log.losses[-5:]) / 5 < sum(log.losses[:5]) / 5
    # a second run on the same backbone reuses the cache: the image tower is not run at all
    task2 = CombinerTask(stage=2, backbone=BackboneConfig("cirlab-tiny", image_transform="targetpad"),
                         cache_dir=str(tmp_path / "cache"))
    task2.backbone.model.load_state_dict(task.backbone.model.state_dict())
    runs = []
    task2.backbone.model.visual.register_forward_hook(lambda *a: runs.append(1))
    trainer2 = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    trainer2.fit(task2, datamodule=RetrievalDataModule(train=str(small_world.path("triplets/train")),
                                                       kind="triplet", batch_size=64, steps_per_epoch=2,
                                                       num_workers=0))
    assert runs == []


def test_cached_features_equal_fresh_encoding(small_world, tmp_path):
    task = CombinerTask(stage=2, backbone=BackboneConfig("cirlab-tiny", image_transform="targetpad"),
                        cache_dir=str(tmp_path / "c"))
    dm = RetrievalDataModule(train=str(small_world.path("triplets/train")), kind="triplet", batch_size=16,
                             steps_per_epoch=1, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    sample = next(dm.triplet_samples(transform=task.image_transform(False)))
    task.eval()
    with torch.no_grad():
        fresh = task.backbone.encode_image(sample["ref"][None])
    assert torch.allclose(task._image_cache.get([sample["ref_id"]]), fresh, atol=1e-5)


def test_validation_reports_benchmark_metrics(small_world, tmp_path):
    task = CombinerTask(stage=1, backbone=BackboneConfig("cirlab-tiny", image_transform="targetpad"),
                        optimizer=OptimizerConfig("adamw", lr=1e-4))
    _fit(task, small_world, steps=1, batch=8, val=True, tmp_path=tmp_path)
    m = task.last_results["synthetic"]
    assert set(m) >= {"R@1", "R@5", "R@10", "mAP@5", "mAP@10", "score"}
    assert all(0.0 <= v <= 100.0 for v in m.values())


def test_checkpoint_round_trip_through_load_task(small_world, tmp_path):
    """A stage-2 checkpoint keeps the Combiner (not the frozen backbone) and loads back equal."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from cirlab.train.commands import load_task

    task = CombinerTask(stage=2, backbone=BackboneConfig("cirlab-tiny", image_transform="targetpad"),
                        optimizer=OptimizerConfig("adam", lr=1e-3), cache_dir=str(tmp_path / "c"))
    export = tmp_path / "bb.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in task.backbone.merged_state_dict().items()}, str(export))
    task.backbone_cfg.pretrained = str(export)  # the checkpoint rebuilds the frozen backbone from here
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", filename="last")
    dm = RetrievalDataModule(train=str(small_world.path("triplets/train")), kind="triplet", batch_size=32,
                             steps_per_epoch=3, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, callbacks=[ck], enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    raw = torch.load(ck.best_model_path, weights_only=True)
    assert not any(k.startswith("backbone.") for k in raw["state_dict"])
    loaded = load_task(ck.best_model_path)
    assert type(loaded) is CombinerTask and loaded.stage == 2
    task.eval()
    loaded.eval()
    ref, txt = torch.randn(3, 64), torch.randn(3, 64)
    assert torch.allclose(task.combine(ref, txt), loaded.combine(ref, txt), atol=1e-6)
    with pytest.raises(CirlabError, match="checkpoint not found"):
        load_task(tmp_path / "nope.ckpt")
    # the checkpoint names its backbone by absolute path and fingerprint: loads from any folder...
    assert raw["hyper_parameters"]["backbone"].pretrained == str(export.resolve())
    assert len(raw["cirlab_backbone"]["fingerprint"]) == 40
    # ...and a backbone file replaced since (a rerun of stage 1) is refused, naming both fingerprints
    torch.manual_seed(1)
    other = CombinerTask(stage=1, backbone=BackboneConfig("cirlab-tiny"))
    save_file({k: v.contiguous() for k, v in other.backbone.merged_state_dict().items()}, str(export))
    with pytest.raises(CirlabError, match=r"fingerprint [0-9a-f]{12}\) is not the one .* fingerprint [0-9a-f]{12}"):
        load_task(ck.best_model_path)


def test_a_trainer_without_logger_writes_nothing_into_the_working_directory(small_world, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    task = CombinerTask(stage=1, backbone=BackboneConfig("cirlab-tiny", image_transform="targetpad"))
    _fit(task, small_world, steps=1, batch=8, val=True)
    dm = RetrievalDataModule(test_sets=[str(small_world.path("eval/test"))], num_workers=0)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).test(task, datamodule=dm)
    assert task.last_results["synthetic"]
    assert list(work.iterdir()) == []


def test_frozen_gallery_is_encoded_once_and_not_decoded_again(small_world, tmp_path):
    task = CombinerTask(stage=2, backbone=BackboneConfig("cirlab-tiny", image_transform="targetpad"),
                        optimizer=OptimizerConfig("adam", lr=1e-3), cache_dir=str(tmp_path / "c"))
    seen = []

    class Watch(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if dataloader_idx == 0:
                seen.append((trainer.current_epoch, "image" in batch))

    runs = []
    task.backbone.model.visual.register_forward_hook(lambda *a: runs.append(1))
    dm = RetrievalDataModule(train=str(small_world.path("triplets/train")), kind="triplet", batch_size=32,
                             steps_per_epoch=2, num_workers=0, val_sets=[str(small_world.path("eval/val"))])
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Watch()])
    trainer.fit(task, datamodule=dm)
    first = [has for e, has in seen if e == 0]
    later = [has for e, has in seen if e > 0]
    # epoch 0 (sanity check included) reads the gallery; later evaluations do not even open its shards
    assert first and all(first) and not later
    runs_after_cache = len(runs)
    trainer.validate(task, datamodule=dm, verbose=False)
    assert len(runs) == runs_after_cache  # no image encoded again
    assert task.last_results["synthetic"]["R@10"] >= 0


def test_ddp_ranks_share_the_stage2_cache_fill(small_world, tmp_path):
    # 2 real processes (gloo) through the CLI: each rank encodes its share of the training shards
    # into its own cache part, then both read both parts and train on the complete cache
    import json

    from cli_runs import fit_on_two_ranks, open_cache, save_tiny_backbone

    from cirlab.data.shards import write_shards
    from cirlab.data.streaming import ShardStream

    triplets = []
    for s in ShardStream(small_world.path("triplets/train"), "triplet", resampled=False, shuffle=False,
                         shuffle_buffer=0, batch_size=None, rank=0, world_size=1, equal_steps=False):
        s.pop("__stream__", None)
        triplets.append(s)
    write_shards(triplets, tmp_path / "triplets", "triplet", maxcount=len(triplets) // 4 + 1)  # 4 shards
    save_tiny_backbone(tmp_path / "s1.safetensors")
    fit_on_two_ranks("recipes/quickstart/combiner.yaml", tmp_path / "runs", "--trainer.limit_val_batches=0",
                     f"--model.init_args.cache_dir={tmp_path / 'cache'}",
                     f"--model.init_args.backbone.pretrained={tmp_path / 's1.safetensors'}",
                     f"--data.init_args.train={tmp_path / 'triplets'}", "--data.init_args.val_sets=[]",
                     "--data.init_args.steps_per_epoch=2", "--data.init_args.batch_size=16")
    (folder,) = [d for d in (tmp_path / "cache").iterdir() if "-image-" in d.name]
    shares = [set(json.loads(p.read_text())) for p in folder.glob("part-*.json")]
    every_image = {s[k] for s in triplets for k in ("ref_id", "tgt_id")}
    assert len(shares) == 2 and all(0 < len(x) < len(every_image) for x in shares)  # the work was split
    assert shares[0] | shares[1] == every_image
    cache = open_cache(folder)
    task = CombinerTask(stage=2, backbone=BackboneConfig("cirlab-tiny", str(tmp_path / "s1.safetensors"),
                                                         image_transform="targetpad"))
    task.eval()
    first = next(iter(ShardStream(tmp_path / "triplets", "triplet", resampled=False, shuffle=False, shuffle_buffer=0,
                                  batch_size=None, rank=0, world_size=1, equal_steps=False)))  # as re-encoded
    with torch.no_grad():
        fresh = task.backbone.encode_image(task.image_transform(train=False)(first["ref"])[None])
    assert torch.allclose(cache.get([first["ref_id"]]), fresh, atol=1e-5)
    assert (tmp_path / "runs" / "combiner" / "version_0" / "export" / "combiner.safetensors").is_file()
