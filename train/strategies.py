"""Sharded strategies (FSDP, DeepSpeed ZeRO 2/3) for the tasks that train towers, and their export.

One recipe key selects the strategy: `trainer.strategy` (docs/recipes.md, "Strategies"):

- `ddp` (default for several devices), `deepspeed_stage_2`, `deepspeed_stage_3` (CUDA only:
  Lightning's DeepSpeedStrategy refuses other accelerators), `fsdp` (Lightning's, CUDA only);
- `cirlab_fsdp`, or `cirlab.train.strategies.FSDPStrategy` as class_path with init_args as
  Lightning's FSDPStrategy (`state_dict_type`, `sharding_strategy`, `cpu_offload`, ...): the same
  FSDP, wrapping each open_clip residual block by default, sharded checkpoint folders by default,
  and running on CPU processes too (gloo; the tests use it).

What the tasks need under FSDP is done here, before the model is wrapped (`prepare_for_strategy`,
called from BaseTask.configure_model): scalar parameters (open_clip's `logit_scale`) become 1-element
vectors (FSDP refuses 0-d parameters), every parameter's rank is recorded (FSDP's flat views are 1-D,
which would move every weight matrix into the no-decay group), and FSDP gets the per-block wrap
policy when the recipe gives none, leaving whole the towers a task calls piece by piece
(`BaseTask.piecewise_modules`: FocalLens's vision tower).

Export: a sharded run's weights exist only as shards on the ranks, so at fit end the checkpoint (the
selected one, or one written now) is consolidated on rank 0 into the plain state dict and loaded into
a fresh CPU copy of the task, which exports exactly as an unsharded run does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies import FSDPStrategy as _LightningFSDP
from torch import nn

from cirlab.errors import CirlabError

log = logging.getLogger(__name__)

# wrapper modules FSDP / activation checkpointing insert into parameter names
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_forward_module.")


def open_clip_blocks() -> set[type[nn.Module]]:
    """The open_clip modules FSDP shards one by one: transformer residual blocks, ResNet bottlenecks."""
    from open_clip.modified_resnet import Bottleneck
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    return {ResidualAttentionBlock, CustomResidualAttentionBlock, Bottleneck}


def clean_name(name: str) -> str:
    """A parameter's name without the wrapper modules a strategy inserted."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def is_fsdp(strategy: Any) -> bool:
    return isinstance(strategy, _LightningFSDP)


def is_sharded(strategy: Any) -> bool:
    """Strategies whose checkpoints are folders and whose module holds only a shard of the weights."""
    return isinstance(strategy, (_LightningFSDP, DeepSpeedStrategy))


def _vectorize_scalar_parameters(module: nn.Module) -> list[str]:
    """Replace every 0-d parameter by a 1-element vector (same value, same requires_grad)."""
    changed = []
    for mod_name, mod in module.named_modules():
        for p_name, p in list(mod.named_parameters(recurse=False)):
            if p is None or p.dim() != 0:
                continue
            setattr(mod, p_name, nn.Parameter(p.detach().reshape(1).clone(), requires_grad=p.requires_grad))
            changed.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return changed


def _piecewise(task: nn.Module) -> list[nn.Module]:
    """The submodules the task names in `piecewise_modules` (see BaseTask)."""
    return [task.get_submodule(name) for name in getattr(task, "piecewise_modules", ())]


def block_wrap_policy(task: nn.Module) -> Any:
    """FSDP's wrap policy: one unit per open_clip block, except blocks inside the task's piecewise
    modules (their pieces are called outside the block's forward, where a unit holds only its shard):
    those stay in the enclosing unit, whole during the step."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    blocks = tuple(open_clip_blocks())
    inside = {id(m) for root in _piecewise(task) for m in root.modules()}
    return CustomPolicy(lambda module: isinstance(module, blocks) and id(module) not in inside)


def prepare_for_strategy(task: nn.Module, strategy: Any) -> None:
    """Called before the strategy wraps `task` (BaseTask.configure_model); see the module docstring."""
    if is_fsdp(strategy):
        if not getattr(task, "_scalars_vectorized", None):
            task._scalars_vectorized = _vectorize_scalar_parameters(task)
        if strategy.kwargs.get("auto_wrap_policy") is None:  # the recipe gave none: per block
            strategy.kwargs["auto_wrap_policy"] = block_wrap_policy(task)
    # recorded before wrapping: FSDP's use_orig_params views are flat 1-D shards
    task._param_ndims = {clean_name(n): p.dim() for n, p in task.named_parameters()}


def loose_parameters(task: nn.Module) -> list[nn.Parameter]:
    """Parameters read outside their owner's forward: the direct parameters of non-leaf modules
    (open_clip's `positional_embedding`, `text_projection`, `proj`, `class_embedding`, `logit_scale`;
    Backbone calls the towers' pieces one by one; MultiheadAttention reads its own in its forward),
    and every parameter of the task's piecewise modules (see BaseTask)."""
    found: dict[int, nn.Parameter] = {}
    for mod in task.modules():
        if isinstance(mod, nn.MultiheadAttention) or not any(True for _ in mod.children()):
            continue
        found.update((id(p), p) for p in mod.parameters(recurse=False))
    for root in _piecewise(task):
        found.update((id(p), p) for p in root.parameters())
    return list(found.values())


def _refuse_evaluation(strategy: Any, stage: str) -> None:
    """Evaluation encodes outside the module's forward (epoch-end hooks, query encoding), where FSDP and
    ZeRO-3 hold only each rank's shard of the weights: a clear error instead of a shape error."""
    if is_fsdp(strategy) or (isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3):
        raise CirlabError(f"{stage} under {type(strategy).__name__} is not supported: the evaluation encodes "
                          "outside the module's forward, where each rank holds only a shard of the weights",
                          "set trainer.limit_val_batches: 0 and num_sanity_val_steps: 0 for this fit, then "
                          "`cirlab evaluate` its export/, or use ddp / deepspeed_stage_2")


class ShardedStrategySupport(pl.Callback):
    """Added to every task (BaseTask.configure_callbacks). Under DeepSpeed ZeRO-3 each module gathers
    its own parameters around its forward only: the loose parameters (see `loose_parameters`) are
    registered with the engine's outer module, whose forward encloses every training step. Under
    FSDP and ZeRO-3, validation and test are refused with the fix (`_refuse_evaluation`)."""

    def on_validation_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        _refuse_evaluation(trainer.strategy, "validation")

    def on_test_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        _refuse_evaluation(trainer.strategy, "test")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        strategy = trainer.strategy
        if not (isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3):
            return
        import deepspeed

        outer = getattr(strategy.model, "module", strategy.model)  # the engine's module: Lightning's wrapper
        for p in loose_parameters(pl_module):
            deepspeed.zero.register_external_parameter(outer, p)


class FSDPStrategy(_LightningFSDP):
    """Lightning's FSDPStrategy with cirlab's defaults: each open_clip block its own FSDP unit,
    sharded checkpoints (one folder, a part per rank), and CPU processes allowed (gloo).
    Evaluation under it is refused with the fix (ShardedStrategySupport)."""

    def __init__(self, *args: Any, auto_wrap_policy: Optional[Any] = None, state_dict_type: str = "sharded",
                 **kwargs: Any) -> None:
        # no policy: the task's per-block policy, set before wrapping (prepare_for_strategy)
        super().__init__(*args, auto_wrap_policy=auto_wrap_policy, state_dict_type=state_dict_type, **kwargs)

    # Why a subclass runs on CPU (Lightning 2.6, torch 2.14): Lightning refuses only the string `fsdp`
    # and its exact class ("ValueError: The strategy `fsdp` requires a GPU accelerator, but received
    # `accelerator='cpu'`"); torch's FSDP, given Lightning's device index (None on CPU), says
    # "RuntimeError: FSDP needs a non-CPU accelerator device, but no accelerator device is detected",
    # and accepts CPU with device_id=cpu. (0-d parameters: "ValueError: FSDP doesn't support scalar
    # parameters", hence prepare_for_strategy.)
    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        # wrap here with device_id=cpu; Lightning then keeps the wrapped model as it is
        from torch.distributed.fsdp import FullyShardedDataParallel

        kwargs = dict(self.kwargs)
        wrapped = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                           mixed_precision=self.mixed_precision_config,
                                           sharding_strategy=self.sharding_strategy, device_id=self.root_device,
                                           **kwargs)
        policy = self.kwargs.pop("auto_wrap_policy", None)  # already applied: no "ignored" warning
        try:
            return super()._setup_model(wrapped)
        finally:
            if policy is not None:
                self.kwargs["auto_wrap_policy"] = policy



def _register() -> None:
    """`trainer.strategy: cirlab_fsdp` (a string a recipe or --trainer.strategy can name)."""
    from lightning.pytorch.strategies import StrategyRegistry

    if "cirlab_fsdp" not in StrategyRegistry:
        StrategyRegistry.register("cirlab_fsdp", FSDPStrategy,
                                  description="FSDP per open_clip block, sharded checkpoints, CPU allowed")


_register()


# ----------------------------------------------------------------------------- export of sharded runs


def _fresh_task(pl_module: Any) -> Any:
    """An unwrapped CPU copy of the task, built from its saved hyper-parameters."""
    from cirlab.train.checkpointing import task_arguments

    cls = type(pl_module)
    return cls(**task_arguments(cls, dict(pl_module.hparams)))


def load_consolidated(task: Any, checkpoint: dict[str, Any]) -> None:
    """Load a consolidated checkpoint into an unwrapped task: omitted frozen backbones put back,
    FSDP's 1-element vectors turned back into the task's scalars."""
    task.on_load_checkpoint(checkpoint)
    sd = dict(checkpoint["state_dict"])
    own = task.state_dict()
    for k, v in list(sd.items()):
        if k in own and v.shape != own[k].shape and v.numel() == own[k].numel() == 1:
            sd[k] = v.reshape(own[k].shape)
    missing, unexpected = task.load_state_dict(sd, strict=False)
    # a frozen backbone may be left out of the checkpoint (it was built from its source again)
    missing = [k for k in missing if not (k.startswith("backbone.") and not task.trainable_backbone())]
    if missing or unexpected:
        raise CirlabError(f"the consolidated checkpoint does not fit {type(task).__name__}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}", "export a checkpoint written by this task's run")


def export_sharded(trainer: pl.Trainer, pl_module: Any) -> Optional[Path]:
    """ExportOnFitEnd under FSDP / DeepSpeed: consolidate the selected (else a fresh) checkpoint, export it."""
    from cirlab.train.sharded import read_checkpoint_any

    ckpt_cb = trainer.checkpoint_callback
    best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb is not None else ""
    log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
    if not log_dir or trainer.logger is None:
        return None
    source = Path(best) if best and Path(best).exists() else None
    if source is None:
        # the last weights exist only as shards: every rank writes its part, rank 0 gathers them
        source = Path(log_dir) / "checkpoints" / "fit-end.ckpt"
        trainer.save_checkpoint(source, weights_only=True)
    out = None
    if trainer.is_global_zero:
        task = _fresh_task(pl_module)
        load_consolidated(task, read_checkpoint_any(source))
        out = Path(log_dir) / "export"
        task.export(out)
        log.info("exported %s (consolidated from %s)", out, source)
    trainer.strategy.barrier("cirlab-export")
    return out
