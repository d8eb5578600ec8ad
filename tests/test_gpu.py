"""The GPU paths: bf16-mixed towers, a ViT-B/32 training step per task family, deepspeed.

Skipped without CUDA (CI has none). On a device machine: `pytest -q tests/test_gpu.py`.
`CIRLAB_GPU_TESTS_ON_CPU=1` dry-runs all but deepspeed on the CPU (bf16 autocast there too),
so the script is known to work before device time is spent on it.
"""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch

from cirlab.data.retrieval import RetrievalDataModule
from cirlab.train.clip_task import CLIPTask
from cirlab.train.combiner_task import CombinerTask
from cirlab.train.config import BackboneConfig, OptimizerConfig, SchedulerConfig
from cirlab.train.lincir_task import LinCIRTask, MaskingConfig

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else ("cpu" if os.environ.get("CIRLAB_GPU_TESTS_ON_CPU") else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA device "
                                "(CIRLAB_GPU_TESTS_ON_CPU=1 dry-runs these tests on the CPU)")
STEPS = 3


def _record_dtypes(obj, name: str, dtypes: list) -> None:
    """Wrap obj.<name> (the real method) to record the dtype of what it returns."""
    real = getattr(obj, name)

    def recording(*args, **kw):
        out = real(*args, **kw)
        dtypes.append(out.dtype)
        return out

    setattr(obj, name, recording)


def _fit(task, dm, precision: str = "bf16-mixed", **trainer_kw) -> list[float]:
    losses: list[float] = []

    class Log(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1, precision=precision,
                        max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Log()], **trainer_kw)
    trainer.fit(task, datamodule=dm)
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses))), losses
    return losses


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v.detach().float().cpu()) for k, v in module.state_dict().items())


def test_vit_b32_clip_step_bf16_mixed(small_world):
    task = CLIPTask(backbone=BackboneConfig("ViT-B-32"), optimizer=OptimizerConfig("adamw", lr=1e-5))
    before = _snapshot(task.backbone)
    dtypes: list = []
    _record_dtypes(task.backbone, "encode_image", dtypes)
    dm = RetrievalDataModule(train=str(small_world.path("pairs")), kind="pair", batch_size=8,
                             steps_per_epoch=STEPS, num_workers=0)
    _fit(task, dm)
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)
    assert _changed(before, task.backbone)
    if CUDA:
        assert torch.cuda.max_memory_allocated() > 0


def test_vit_b32_lincir_bf16_mixed_trains_phi_only(small_world, tmp_path):
    task = LinCIRTask(backbone=BackboneConfig("ViT-B-32"), masking=MaskingConfig("lexicon", "synthetic"),
                      cache_dir=str(tmp_path))
    tower, phi = _snapshot(task.backbone), _snapshot(task.phi)
    dtypes: list = []
    _record_dtypes(task.backbone, "encode_text_with_pseudo_tokens", dtypes)
    dm = RetrievalDataModule(train=str(small_world.path("texts")), kind="text", batch_size=16,
                             steps_per_epoch=STEPS, num_workers=0)
    _fit(task, dm)
    assert dtypes == [torch.bfloat16] * STEPS
    assert task.backbone.image_parameters() == []
    assert _changed(phi, task.phi) and not _changed(tower, task.backbone)


def test_vit_b32_combiner_stage1_mixed_precision(small_world):
    # the published stage-1 recipes use 16-mixed (fp16 + grad scaler) on CUDA; CPU autocast is bf16
    task = CombinerTask(stage=1, backbone=BackboneConfig("ViT-B-32"),
                        optimizer=OptimizerConfig("adamw", lr=1e-5))
    before = _snapshot(task.backbone)
    dm = RetrievalDataModule(train=str(small_world.path("triplets/train")), kind="triplet", batch_size=8,
                             steps_per_epoch=STEPS, num_workers=0)
    _fit(task, dm, precision="16-mixed" if CUDA else "bf16-mixed")
    assert _changed(before, task.backbone)


@pytest.mark.skipif(not CUDA, reason="deepspeed needs CUDA")
def test_deepspeed_stage_2_clip_step(small_world, tmp_path):
    pytest.importorskip("deepspeed", reason="pip install 'cirlab[deepspeed]'")
    task = CLIPTask(backbone=BackboneConfig("ViT-B-32"), optimizer=OptimizerConfig("adamw", lr=1e-5))
    before = _snapshot(task.backbone)
    dm = RetrievalDataModule(train=str(small_world.path("pairs")), kind="pair", batch_size=8,
                             steps_per_epoch=STEPS, num_workers=0)
    _fit(task, dm, strategy="deepspeed_stage_2", default_root_dir=str(tmp_path))
    assert _changed(before, task.backbone)


# ----------------------------------------------------------------------------- sharded strategies
# DeepSpeed is CUDA only (Lightning: "The DeepSpeed strategy is only supported on CUDA GPUs but
# `CPUAccelerator` is used."); Lightning's `fsdp` string asks for a GPU too ("The strategy `fsdp`
# requires a GPU accelerator"), cirlab's FSDPStrategy runs on CPU processes (tests/test_strategies.py).
# Here: each on one GPU, fit, then the export (consolidated from the strategy's checkpoint) must equal
# the weights the strategy itself gathers.

STRATEGY_STEPS = 3


def _strategy_task(kind: str):
    torch.manual_seed(0)
    opt = OptimizerConfig("adamw", lr=1e-3, weight_decay=0.1, no_decay_on_bias_and_norm=True)
    if kind == "clip":
        return CLIPTask(backbone=BackboneConfig("ViT-B-32"), optimizer=opt,
                        scheduler=SchedulerConfig("constant")), "pairs", "pair"
    if kind == "combiner":
        return CombinerTask(stage=1, backbone=BackboneConfig("ViT-B-32"), optimizer=opt,
                            scheduler=SchedulerConfig("constant")), "triplets/train", "triplet"
    from cirlab.train.focallens_task import FocalLensTask

    return FocalLensTask(backbone=BackboneConfig("ViT-B-32", freeze_text=True), optimizer=opt,
                         scheduler=SchedulerConfig("constant")), "instructions", "instruction"


def _gathered(trainer) -> dict[str, torch.Tensor]:
    """The task's weights as the strategy gathers them (the reference for the export)."""
    from cirlab.train.strategies import is_fsdp

    strategy = trainer.strategy
    if is_fsdp(strategy):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(strategy.model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            full = strategy.model.state_dict()
    else:  # DeepSpeed: ZeRO-3 parameters are partitioned outside a forward; gather them
        import deepspeed

        module = trainer.lightning_module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            full = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.float().cpu() for k, v in full.items()}


def _part(full: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}


@pytest.mark.skipif(not CUDA, reason="sharded strategies are tested on CUDA here; FSDP on CPU in test_strategies.py")
@pytest.mark.parametrize("strategy, kind", [
    ("deepspeed_stage_2", "clip"), ("deepspeed_stage_3", "clip"), ("deepspeed_stage_3", "combiner"),
    ("deepspeed_stage_2", "focallens"), ("deepspeed_stage_3", "focallens"), ("fsdp", "clip"),
    ("cirlab_fsdp", "combiner"), ("cirlab_fsdp", "focallens"),
])
def test_sharded_strategy_fit_exports_the_gathered_weights(strategy, kind, small_world, tmp_path):
    from lightning.pytorch.loggers import CSVLogger
    from safetensors.torch import load_file

    from cirlab.train.strategies import FSDPStrategy

    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="pip install 'cirlab[deepspeed]'")
    task, shards, data_kind = _strategy_task(kind)
    before = {k: v.detach().float().clone() for k, v in task.backbone.merged_state_dict().items()}
    dm = RetrievalDataModule(train=str(small_world.path(shards)), kind=data_kind, batch_size=8,
                             steps_per_epoch=STRATEGY_STEPS, num_workers=0)
    losses: list[float] = []

    class Log(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    # no checkpoint callback: the export consolidates the checkpoint it writes at fit end
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="32-true", max_epochs=1, limit_val_batches=0,
                        num_sanity_val_steps=0, logger=CSVLogger(tmp_path, name="run", version=0),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        strategy=FSDPStrategy() if strategy == "cirlab_fsdp" else strategy, callbacks=[Log()])
    trainer.fit(task, datamodule=dm)
    assert len(losses) == STRATEGY_STEPS and all(torch.isfinite(torch.tensor(losses))), losses
    full = _gathered(trainer)
    export = tmp_path / "run" / "version_0" / "export"
    files = {"backbone": "backbone.model.", "focallens": "focallens."}
    assert sorted(p.name for p in export.iterdir()) == sorted(f"{n}.safetensors" for n in files
                                                              if n == "backbone" or kind == n)
    for name, prefix in files.items():
        if not (export / f"{name}.safetensors").is_file():
            continue
        got, reference = load_file(str(export / f"{name}.safetensors")), _part(full, prefix)
        assert got.keys() == reference.keys(), name
        worst = max((v.float() - reference[k].reshape(v.shape)).abs().max().item() for k, v in got.items())
        assert worst <= 1e-6, f"{strategy}: {name} export differs from the gathered weights by {worst}"
    exported = load_file(str(export / "backbone.safetensors"))
    moved = max((exported[k].float() - before[k].reshape(exported[k].shape)).abs().max().item()
                for k in exported if k in before)
    assert moved > 0, "training changed nothing"
