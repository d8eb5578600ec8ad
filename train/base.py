"""The one base every cirlab task derives from (TorchGeo's BaseTask pattern).

It owns what every task shares: the backbone built from the recipe, the optimizer and schedule,
keeping a frozen backbone in eval mode, export of the trained weights, and self-contained
checkpoints (train/checkpointing.py). Families add the rest: composed retrieval
(train/composed.py), CLIP pairs (train/clip_task.py), conditional embeddings. A method fills the
``configure_*`` hooks and ``training_step``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from cirlab.errors import USER_ERRORS, CirlabError
from cirlab.models.backbone import Backbone
from cirlab.train.config import BackboneConfig, EvalConfig, OptimizerConfig, SchedulerConfig
from cirlab.train.optim import build_optimizer, lr_lambda
from cirlab.train import strategies as _strategies  # noqa: F401  registers `strategy="cirlab_fsdp"` with Lightning

log = logging.getLogger(__name__)


def build_backbone(cfg: BackboneConfig, load_image_tower: bool = True) -> Backbone:
    """A Backbone from its recipe section."""
    lora = asdict(cfg.lora) if cfg.lora is not None else None
    return Backbone(cfg.model_name, cfg.pretrained, load_image_tower=load_image_tower,
                    freeze_image=cfg.freeze_image, freeze_text=cfg.freeze_text,
                    grad_checkpointing=cfg.grad_checkpointing, lora=lora)


def exported_backbone(export_dir: str | Path) -> str:
    """The `pretrained` value for a run's exported backbone: its weights file, or the source that
    `backbone.json` names when the backbone was frozen."""
    out = Path(export_dir)
    if (out / "backbone.safetensors").is_file():
        return str(out / "backbone.safetensors")
    if (out / "backbone.json").is_file():
        return json.loads((out / "backbone.json").read_text())["pretrained"]
    raise CirlabError(f"no backbone.safetensors or backbone.json in {out}", "point at a run's export/ folder")


def _recipe_dataclasses(cls: type) -> list[type]:
    """The dataclass types a task's constructor takes (its recipe sections), Optional[...] unwrapped."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable forward references: nothing to register
        return []
    found: list[type] = []

    def walk(t: Any) -> None:
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            found.append(t)
        for arg in typing.get_args(t):
            walk(arg)

    for name, hint in hints.items():
        if name != "return":
            walk(hint)
    return found


class BaseTask(L.LightningModule):
    """Shared parts of every cirlab task; subclasses fill the configure_* hooks and training_step.

    Recipe sections left out (None) take the method's reference defaults (`default_*` below).
    """

    #: keep the backbone in eval mode while training (frozen BatchNorm statistics, no dropout)
    backbone_eval_mode: bool = False
    #: whether the image tower is built (text-only training such as LinCIR's skips it)
    needs_image_tower: bool = True
    #: submodules whose blocks the method calls piece by piece, not through their forward: sharded
    #: strategies keep them whole during a step (train/strategies.py)
    piecewise_modules: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # checkpoints keep the recipe sections in their hyper-parameters: let torch.load(weights_only=True)
        # read every task's sections, for tasks defined anywhere (no list of known tasks)
        torch.serialization.add_safe_globals(_recipe_dataclasses(cls))

    def default_optimizer(self) -> OptimizerConfig:
        return OptimizerConfig()

    def default_scheduler(self) -> SchedulerConfig:
        return SchedulerConfig()

    def default_backbone(self) -> BackboneConfig:
        return BackboneConfig()

    def __init__(self, backbone: Optional[BackboneConfig] = None, optimizer: Optional[OptimizerConfig] = None,
                 scheduler: Optional[SchedulerConfig] = None, evaluation: Optional[EvalConfig] = None) -> None:
        super().__init__()
        self.backbone_cfg = backbone or self.default_backbone()
        self.optimizer_cfg = optimizer or self.default_optimizer()
        self.scheduler_cfg = scheduler or self.default_scheduler()
        self.eval_cfg = evaluation or EvalConfig()
        self.save_hyperparameters()
        self.last_results: dict[str, dict[str, float]] = {}
        self.configure_models()
        self.configure_losses()

    # ----------------------------------------------------------------- hooks for the methods
    def configure_models(self) -> None:
        """Build the networks. The default builds the backbone only."""
        self.backbone = build_backbone(self.backbone_cfg, load_image_tower=self.needs_image_tower)

    def configure_losses(self) -> None:
        """Build loss modules (most methods call cirlab.losses functions directly and need none)."""

    def configure_metrics(self, stage: str) -> None:
        """Build the evaluation for a stage ("fit", "validate", "test") once the data module is known."""

    def configure_datamodule(self, dm: Any) -> None:
        """Method hook: e.g. stage 2 turns off image decoding for training batches."""

    def export_modules(self) -> dict[str, nn.Module]:
        """Modules written as safetensors at the end of fit (besides the backbone)."""
        return {}

    def image_transform(self, train: bool):
        """The transform images go through; the recipe picks clip / targetpad / squarepad."""
        kw = {}
        if train and self.backbone_cfg.train_scale is not None:
            kw["train_scale"] = tuple(self.backbone_cfg.train_scale)
        return self.backbone.transform(self.backbone_cfg.image_transform, train=train, **kw)

    def trainable_backbone(self) -> bool:
        return any(p.requires_grad for p in self.backbone.parameters())

    def prepare_for_evaluation(self) -> None:
        """Called before a loaded task evaluates or retrieves outside a Trainer (cirlab evaluate/retrieve)."""

    def setup(self, stage: str) -> None:
        """Hand the data module this model's image transforms, let the method adjust it, build the metrics."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            self.before_transforms(stage, dm)
            if hasattr(dm, "set_transforms"):
                dm.set_transforms(self.image_transform(train=True), self.image_transform(train=False))
            self.configure_datamodule(dm)
        self.configure_metrics(stage)

    def before_transforms(self, stage: str, dm: Any) -> None:
        """Family hook run in setup before the transforms are read (e.g. load a missing image tower)."""

    def configure_callbacks(self) -> list[L.Callback]:
        from cirlab.train.checkpointing import ExportOnFitEnd
        from cirlab.train.strategies import ShardedStrategySupport

        return [ExportOnFitEnd(), ShardedStrategySupport()]

    def configure_model(self) -> None:
        """Lightning's hook before the strategy wraps the model: what FSDP needs (train/strategies.py)."""
        from cirlab.train.strategies import prepare_for_strategy

        prepare_for_strategy(self, self.trainer.strategy)

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        # parameter ranks as recorded before a sharding strategy flattened them (train/strategies.py)
        opt = build_optimizer(self.named_parameters(), self.optimizer_cfg, getattr(self, "_param_ndims", None))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.scheduler_cfg, self.schedule_length()))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def schedule_length(self) -> int:
        """Total optimizer steps the schedule spans: the recipe's, else the trainer's estimate.

        A decaying schedule over an unknown length would silently end after one step: an error instead.
        """
        total = self.scheduler_cfg.total_steps
        if total is not None:
            return int(total)
        if self.scheduler_cfg.name.lower() == "constant":
            return max(1, self.scheduler_cfg.warmup_steps + 1)  # length does not matter past warm-up
        estimate: Optional[float] = None
        if self._trainer is not None:
            try:
                estimate = float(self.trainer.estimated_stepping_batches)
            except USER_ERRORS:  # missing shards: that, not the schedule, is what the user must fix
                raise
            except Exception as err:  # an unsized loader
                log.debug("no step estimate: %s", err)
        if estimate is None or not 0 < estimate < 10**12:
            raise CirlabError(f"the {self.scheduler_cfg.name} learning-rate schedule needs its length, and the "
                              "number of training steps is unknown here",
                              "set model.init_args.scheduler.total_steps, or trainer.max_steps, or "
                              "trainer.max_epochs with data.init_args.steps_per_epoch")
        return int(estimate)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.backbone_eval_mode:
            self.backbone.eval()
        return self

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning restores saved per-module modes after validation (bypassing train()): re-assert
        if self.backbone_eval_mode and self.backbone.training:
            self.backbone.eval()

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from cirlab.train.checkpointing import save_task_state

        save_task_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from cirlab.train.checkpointing import load_task_state

        load_task_state(self, checkpoint)

    # ----------------------------------------------------------------- export
    def export(self, out_dir: str | Path) -> dict[str, Path]:
        """Write the method's modules as safetensors, and the backbone: its weights (open_clip state
        dict) when training changed them, else `backbone.json` naming the unchanged source."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = {}
        states = {n: m.state_dict() for n, m in self.export_modules().items()}
        source = self.backbone_cfg.pretrained
        if self.trainable_backbone() or not source:
            # open_clip's own key names (LoRA folded in), so pretrained=<file> loads it
            states["backbone"] = self.backbone.merged_state_dict()
        else:
            # frozen: a copy would only repeat `pretrained` (GBs for ViT-bigG; text-only for LinCIR)
            if Path(source).is_file():
                source = str(Path(source).resolve())
            path = out / "backbone.json"
            path.write_text(json.dumps({"model_name": self.backbone_cfg.model_name, "pretrained": source,
                                        "frozen": True}, indent=2) + "\n")
            written["backbone"] = path
        for name, sd in states.items():
            state = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
            path = out / f"{name}.safetensors"
            save_file(state, str(path))
            written[name] = path
        return written

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)
