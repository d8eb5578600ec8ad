"""Sharded strategies: FSDP on 2 real CPU processes (gloo) against DDP, export from a sharded checkpoint
folder, and the pieces FSDP needs (parameter ranks, scalar parameters, a clear error for validation).
DeepSpeed needs CUDA (Lightning: "The DeepSpeed strategy is only supported on CUDA GPUs"): its cases
are in tests/test_gpu.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cirlab.errors import CirlabError
from cirlab.train.config import OptimizerConfig
from cirlab.train.optim import param_groups

SCRIPT = Path(__file__).with_name("strategy_script.py")


def test_parameter_groups_use_the_ranks_recorded_before_sharding():
    # what FSDP's use_orig_params shows after wrapping: flat 1-D views under wrapper names
    weight = nn.Parameter(torch.zeros(12))  # a (3, 4) matrix before sharding
    bias, ln = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    named = [("backbone.model.transformer.resblocks.0._fsdp_wrapped_module.mlp.c_fc.weight", weight),
             ("backbone.model.transformer.resblocks.0._fsdp_wrapped_module.mlp.c_fc.bias", bias),
             ("backbone.model.ln_final.weight", ln)]
    ndims = {"backbone.model.transformer.resblocks.0.mlp.c_fc.weight": 2,
             "backbone.model.transformer.resblocks.0.mlp.c_fc.bias": 1, "backbone.model.ln_final.weight": 1}
    cfg = OptimizerConfig(weight_decay=0.1, no_decay_on_bias_and_norm=True)
    decay, no_decay = param_groups(named, cfg, ndims)
    assert decay["params"] == [weight] and decay["weight_decay"] == 0.1
    assert no_decay["params"] == [bias, ln] and no_decay["weight_decay"] == 0.0
    # without the recorded ranks the flat view would skip decay (the bug this guards against)
    assert param_groups(named, cfg)[0]["params"] == []


def test_scalar_parameters_become_vectors_for_fsdp_and_load_back_as_scalars(tmp_path):
    from cirlab.train.clip_task import CLIPTask
    from cirlab.train.config import BackboneConfig
    from cirlab.train.strategies import FSDPStrategy, load_consolidated, prepare_for_strategy

    task = CLIPTask(backbone=BackboneConfig("cirlab-tiny"), learnable_temperature=True, init_logit_scale=20.0)
    plain = {k: v.clone() for k, v in task.state_dict().items()}
    strategy = FSDPStrategy()
    prepare_for_strategy(task, strategy)
    scale = task.backbone.model.logit_scale
    assert scale.shape == (1,) and scale.requires_grad
    assert float(scale) == pytest.approx(float(torch.log(torch.tensor(20.0))))
    assert task._scalars_vectorized == ["backbone.model.logit_scale"]
    assert task._param_ndims["backbone.model.visual.conv1.weight"] == 4
    assert "auto_wrap_policy" in strategy.kwargs
    # a fresh (unwrapped) task takes the vectorised checkpoint back with its own scalar shape
    fresh = CLIPTask(backbone=BackboneConfig("cirlab-tiny"), learnable_temperature=True)
    load_consolidated(fresh, {"state_dict": task.state_dict()})
    assert fresh.backbone.model.logit_scale.shape == ()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, plain[k]), k
    with pytest.raises(CirlabError, match="unexpected"):
        load_consolidated(fresh, {"state_dict": {**task.state_dict(), "extra.weight": torch.zeros(1)}})


def test_evaluation_under_fsdp_is_refused_with_the_fix():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy as LightningFSDP

    from cirlab.train.strategies import FSDPStrategy, ShardedStrategySupport

    cb = ShardedStrategySupport()
    for strategy in (FSDPStrategy(), LightningFSDP()):
        with pytest.raises(CirlabError, match="limit_val_batches"):
            cb.on_validation_start(SimpleNamespace(strategy=strategy), None)
        with pytest.raises(CirlabError, match="FSDPStrategy"):
            cb.on_test_start(SimpleNamespace(strategy=strategy), None)
    cb.on_validation_start(SimpleNamespace(strategy=object()), None)  # ddp and others: nothing to refuse


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from cirlab.data.synthetic import build_world

    root = tmp_path_factory.mktemp("strategyworld") / "world"
    build_world(root, seed=0, n_train_scenes=32, n_eval_queries=8, renders_per_scene=1, shard_size=8,
                n_triplets=4, n_texts=4, instructions_per_scene=1)
    return root


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(world: Path, out: Path) -> None:
    """Both ranks started here (as torchrun would): Lightning then launches none, and one start-up
    serves the ddp and the FSDP fit."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPT.parent), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, WORLD_SIZE="2", NODE_RANK="0", RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), str(world), str(out)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def two_ranks(tiny_world, tmp_path_factory):
    """Every 2-process fit of tests/strategy_script.py, run once for the tests below (one start-up)."""
    out = tmp_path_factory.mktemp("two_ranks")
    _run_two_ranks(tiny_world, out)
    return out


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_matches_ddp_and_exports_the_gathered_weights(two_ranks, tiny_world):
    tmp_path = two_ranks
    names = ("ddp", "fsdp", "fsdp_full")
    runs = {w: [json.loads((tmp_path / f"{w}-rank{r}.json").read_text()) for r in (0, 1)] for w in names}
    # FSDP saved its checkpoint as a folder of per-rank parts (torch.distributed.checkpoint)
    best = Path(runs["fsdp"][0]["best"])
    assert best.is_dir() and (best / ".metadata").is_file() and len(list(best.glob("*.distcp"))) == 2
    assert Path(runs["ddp"][0]["best"]).is_file() and Path(runs["fsdp_full"][0]["best"]).is_file()
    # the same losses on each rank, step by step (3 steps of 2 x 4 samples)
    for which in ("fsdp", "fsdp_full"):
        for r in (0, 1):
            assert len(runs[which][r]["losses"]) == 3
            assert runs[which][r]["losses"] == pytest.approx(runs["ddp"][r]["losses"], abs=1e-5)
    for which in names:
        exported = load_file(str(tmp_path / which / "version_0" / "export" / "backbone.safetensors"))
        # the reference: the weights as the strategy gathers them itself (FSDP FULL_STATE_DICT)
        full = torch.load(tmp_path / f"{which}-full.pt", weights_only=True)
        ref = {k.removeprefix("backbone.model."): v for k, v in full.items() if k.startswith("backbone.model.")}
        assert exported.keys() == ref.keys()
        for k, v in exported.items():
            assert v.shape == ref[k].reshape(v.shape).shape and v.dtype == ref[k].dtype
            assert (v - ref[k].reshape(v.shape)).abs().max().item() <= 1e-6, (which, k)
        assert exported["logit_scale"].shape == ()  # FSDP's 1-element vector written back as open_clip's scalar
    a = load_file(str(tmp_path / "fsdp" / "version_0" / "export" / "backbone.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "version_0" / "export" / "backbone.safetensors"))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, f"FSDP and DDP weights differ by {worst}"
    # FocalLens (the vision tower's pieces called one by one) under FSDP: both exports as gathered
    full = torch.load(tmp_path / "fsdp_focallens-full.pt", weights_only=True)
    export = tmp_path / "fsdp_focallens" / "version_0" / "export"
    for name, prefix in (("backbone", "backbone.model."), ("focallens", "focallens.")):
        got = load_file(str(export / f"{name}.safetensors"))
        ref = {k.removeprefix(prefix): v for k, v in full.items() if k.startswith(prefix)}
        assert got.keys() == ref.keys(), name
        assert max((v - ref[k].reshape(v.shape)).abs().max().item() for k, v in got.items()) <= 1e-6, name
    from cirlab.data.shards import read_index

    focal = json.loads((tmp_path / "fsdp_focallens-rank1.json").read_text())["losses"]
    assert len(focal) == min(3, read_index(tiny_world / "instructions").total // 16) >= 2, focal  # 2 x 8 a step
    # training moved the weights (an export of the initial weights would match nothing above by chance)
    init = torch.load(tmp_path / "fsdp-init.pt", weights_only=True)
    assert max((a[k] - init[k].reshape(a[k].shape)).abs().max().item() for k in a) > 1e-4


@pytest.mark.slow
def test_fsdp_preemption_checkpoint_is_a_sharded_folder_and_resumes_exactly(two_ranks):
    """The SLURM requeue's path (SlurmRequeue, Lightning's "hpc" resume) under FSDP, without a SLURM."""
    out = two_ranks / "requeue"
    result = json.loads((out / "requeue.json").read_text())
    assert result["folder"] and result["parts"] == 2  # one part per rank, nothing gathered on rank 0
    reference = {int(k): v for k, v in result["reference"].items()}
    preempted = {int(k): v for k, v in result["preempted"].items()}
    resumed = {int(k): v for k, v in result["resumed"].items()}
    # the signal came during step 2 (global step 1): checkpoint after it, the resume runs the rest
    assert sorted(preempted) == [1, 2] and sorted(resumed) == list(range(3, max(reference) + 1))
    assert {**preempted, **resumed} == pytest.approx(reference, abs=1e-6)
    a = load_file(str(out / "job" / "version_0" / "export" / "backbone.safetensors"))
    b = load_file(str(out / "reference" / "version_0" / "export" / "backbone.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
