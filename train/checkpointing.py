"""Self-contained, verified checkpoints; loading any task by its class; export at the end of fit.

A checkpoint names its task class (`_class_path`, what LightningCLI writes too), so any subclass of
BaseTask loads, wherever it is defined: no list of known tasks. A frozen backbone is left out of the
state dict only when its source can be resolved again: an open_clip tag, or a local file recorded by
its absolute path; its fingerprint is recorded and checked on load, so a source that changed since
(a stage-1 export overwritten by a rerun) is an error naming both fingerprints, never a silent swap.
A frozen backbone whose source is a run's own export (which a rerun may replace) or which was randomly
initialised is embedded instead.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from cirlab.errors import CirlabError

log = logging.getLogger(__name__)

_BACKBONE_PREFIX = "backbone."


def backbone_fingerprint(backbone: Any, include_visual: bool) -> str:
    """sha1 over the model name and the open_clip state dict (sorted keys), the image tower optional:
    a text-only run (LinCIR) and its reload with the tower compare the same tensors."""
    h = hashlib.sha1(backbone.model_name.encode())
    state = backbone.model.state_dict()
    for key in sorted(state):
        if not include_visual and key.startswith("visual."):
            continue
        t = state[key].detach()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _is_local_file(source: str) -> bool:
    return Path(source).is_file()


def _is_run_export(path: Path) -> bool:
    """A file inside a run's export/ folder: a rerun of that recipe may replace it."""
    return path.parent.name == "export" and (path.parent / "backbone.safetensors").exists()


def _with_pretrained(section: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(section):
        return dataclasses.replace(section, pretrained=value)
    if isinstance(section, dict):
        return {**section, "pretrained": value}
    return section


def save_task_state(task: Any, checkpoint: dict[str, Any]) -> None:
    """on_save_checkpoint: the class path, and the backbone left out (recorded) or kept."""
    class_path = f"{type(task).__module__}.{type(task).__qualname__}"
    checkpoint["cirlab_task"] = class_path
    hp = checkpoint.setdefault("hyper_parameters", {})
    hp.setdefault("_class_path", class_path)  # what LightningCLI writes: `cirlab test --ckpt_path` reads it
    trainer = getattr(task, "_trainer", None)
    for logger in (trainer.loggers if trainer is not None else []):
        if type(logger).__name__ == "WandbLogger" and logger.version:
            checkpoint["cirlab_wandb_id"] = str(logger.version)  # `cirlab fit --ckpt_path` continues it
    cfg = task.backbone_cfg
    include_visual = bool(task.needs_image_tower)
    if task.trainable_backbone() or not cfg.pretrained:
        return  # trained or random weights: they are in the state dict
    source = str(cfg.pretrained)
    record: dict[str, Any] = {"model_name": cfg.model_name, "source": source, "include_visual": include_visual}
    if _is_local_file(source):
        path = Path(source).resolve()
        record["source"] = str(path)
        if _is_run_export(path):
            # a run's export can be replaced by a rerun: embed the weights, rebuild from nothing
            record["embedded"] = True
            checkpoint["cirlab_backbone"] = record
            if "backbone" in hp:
                hp["backbone"] = _with_pretrained(hp["backbone"], None)
            _drop_visual_if_absent(task, checkpoint["state_dict"])
            if not include_visual:  # LinCIR: the tower its evaluation ranks images with, from the same export
                checkpoint["state_dict"].update(_export_image_tower(path))
            return
        if "backbone" in hp:
            hp["backbone"] = _with_pretrained(hp["backbone"], str(path))  # loads from any folder
    fp = getattr(task, "_backbone_fp", None)
    if fp is None:  # frozen: computed once per task
        fp = task._backbone_fp = backbone_fingerprint(task.backbone, include_visual)
    record["fingerprint"] = fp
    checkpoint["cirlab_backbone"] = record
    sd = checkpoint["state_dict"]
    for k in [k for k in sd if k.startswith(_BACKBONE_PREFIX)]:
        del sd[k]


_VISUAL_PREFIX = _BACKBONE_PREFIX + "model.visual."


def _export_image_tower(path: Path) -> dict[str, torch.Tensor]:
    """The image tower's weights in a run's export (open_clip keys, written by cirlab), read alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {_BACKBONE_PREFIX + "model." + k: f.get_tensor(k) for k in f.keys() if k.startswith("visual.")}


def _drop_visual_if_absent(task: Any, sd: dict[str, Any]) -> None:
    """A task built without its image tower reloads without one: keep the saved keys to what it has."""
    if not task.needs_image_tower:
        for k in [k for k in sd if k.startswith("backbone.model.visual.")]:
            del sd[k]


def load_task_state(task: Any, checkpoint: dict[str, Any]) -> None:
    """on_load_checkpoint: put back a left-out backbone after checking it is the one trained with."""
    sd = checkpoint.get("state_dict")
    if sd is None:  # a sharded strategy (FSDP folder) loaded the weights into the wrapped model itself
        return
    record = checkpoint.get("cirlab_backbone")
    if record is not None and not record.get("embedded"):
        want = record.get("fingerprint")
        have = backbone_fingerprint(task.backbone, bool(record.get("include_visual", True)))
        if want is not None and have != want:
            raise CirlabError(f"the backbone built from {task.backbone_cfg.pretrained!r} (fingerprint {have[:12]}) "
                              f"is not the one this checkpoint was trained with ({record.get('source')!r}, "
                              f"fingerprint {want[:12]})",
                              "restore that backbone file, or point backbone.pretrained at the original")
        task._backbone_fp = have
    if record is not None and not record.get("embedded") or checkpoint.get("cirlab_backbone_omitted"):
        for k, v in task.backbone.state_dict(prefix=_BACKBONE_PREFIX).items():
            sd.setdefault(k, v)
    if getattr(task.backbone.model, "visual", None) is None:
        # an embedded image tower for a task built without one (LinCIR): kept for ensure_image_tower
        tower = {k[len(_VISUAL_PREFIX):]: sd.pop(k) for k in [k for k in sd if k.startswith(_VISUAL_PREFIX)]}
        if tower:
            task._embedded_image_tower = tower
    own = task.state_dict()
    # trained without an image tower (LinCIR), loaded with one: the tower is the fresh one built
    for k, v in own.items():
        if k.startswith("backbone.model.visual.") and k not in sd:
            sd[k] = v
    for k in [k for k in sd if k.startswith("backbone.model.visual.") and k not in own]:
        del sd[k]


# ----------------------------------------------------------------------------- loading by class
def _import_globals(path: Path) -> None:
    """Import the modules of the classes a checkpoint names, so their recipe dataclasses register as
    safe (BaseTask.__init_subclass__): tasks defined anywhere load, nothing but plain data unpickles."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint: torch.load below reports it
        return
    for name in names:
        module = name.rsplit(".", 1)[0]
        try:
            importlib.import_module(module)
        except Exception:
            log.debug("could not import %s named by %s", module, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint written by `cirlab fit`, loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        hint = "a DeepSpeed/FSDP checkpoint is a folder: export it first" if path.is_dir() else \
            "pass a .ckpt file written by `cirlab fit` (runs/<name>/version_N/checkpoints/)"
        raise CirlabError(f"checkpoint not found: {path}", hint)
    _import_globals(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CirlabError(f"{path} holds objects cirlab does not load ({first.split('GLOBAL')[-1].strip()})",
                              "only checkpoints written by cirlab tasks are read; cirlab never unpickles code") from None
        raise CirlabError(f"{path} is not a readable checkpoint ({type(err).__name__})",
                          "the file is damaged or not a torch checkpoint: use another .ckpt of the run") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise CirlabError(f"{path} is not a Lightning checkpoint (no state_dict)", "pass a .ckpt written by `cirlab fit`")
    return obj


def task_class(checkpoint: dict[str, Any], path: str | Path = "checkpoint") -> type:
    """The BaseTask subclass a checkpoint names (imported from wherever it is defined)."""
    from cirlab.train.base import BaseTask

    class_path = checkpoint.get("cirlab_task") or checkpoint.get("hyper_parameters", {}).get("_class_path")
    if not class_path or "." not in str(class_path):
        raise CirlabError(f"{path} names no task class", "it was not written by a cirlab task")
    module, name = str(class_path).rsplit(".", 1)
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise CirlabError(f"{path} was written by {class_path}, which cannot be imported here ({err})",
                          "install or put on PYTHONPATH the package that defines it") from None
    if not (isinstance(cls, type) and issubclass(cls, BaseTask)):
        raise CirlabError(f"{class_path} (named by {path}) is not a cirlab task", "pass a checkpoint of a cirlab run")
    return cls


def _coerce(value: Any, hint: Any) -> Any:
    """A recipe section saved as a dict (LightningCLI keeps the parsed config) back as its dataclass."""
    import typing

    if isinstance(value, dict):
        for t in (hint, *typing.get_args(hint)):
            if isinstance(t, type) and dataclasses.is_dataclass(t):
                hints = typing.get_type_hints(t)
                names = {f.name for f in dataclasses.fields(t)}
                return t(**{k: _coerce(v, hints.get(k)) for k, v in value.items() if k in names})
    return value


def task_arguments(cls: type, hparams: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments from saved hyper-parameters (Lightning's own `_…` keys dropped)."""
    import typing

    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:
        hints = {}
    return {k: _coerce(v, hints.get(k)) for k, v in hparams.items() if not k.startswith("_")}


def load_task(ckpt: str | Path, **overrides: Any):
    """A task back from a checkpoint of `cirlab fit`, ready to evaluate or retrieve (any task class)."""
    path = Path(ckpt)
    checkpoint = read_checkpoint(path)
    cls = task_class(checkpoint, path)
    hp = task_arguments(cls, checkpoint.get("hyper_parameters", {}))
    hp.update(overrides)
    weights = checkpoint.get("state_dict") or {}
    carried = any(k.startswith(_BACKBONE_PREFIX) for k in weights)
    if carried and getattr(hp.get("backbone"), "pretrained", "") is None:
        # the backbone is built at random and its weights come from the checkpoint a moment later:
        # open_clip's "Model initialized randomly" would tell the user the opposite of what happens
        from cirlab.models.loading import quiet_random_init

        with quiet_random_init():
            task = cls(**hp)
    else:
        task = cls(**hp)
    task.on_load_checkpoint(checkpoint)
    task.load_state_dict(checkpoint["state_dict"])
    return task.eval()


# ----------------------------------------------------------------------------- export
class ExportOnFitEnd(L.Callback):
    """At the end of fit, export the selected model (the monitored best, else the last weights)."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        from cirlab.train.strategies import export_sharded, is_sharded

        if is_sharded(trainer.strategy):  # FSDP / DeepSpeed: weights only as shards, consolidate them
            export_sharded(trainer, pl_module)
            return
        ckpt_cb = trainer.checkpoint_callback
        best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb is not None else ""
        if best and Path(best).is_file():
            state = read_checkpoint(best)
            pl_module.on_load_checkpoint(state)  # puts back an omitted frozen backbone
            pl_module.load_state_dict(state["state_dict"])
        elif best and Path(best).is_dir():
            # DeepSpeed / FSDP write folders: consolidate them, never export the last weights silently
            try:
                from cirlab.train.sharded import consolidate_checkpoint
            except ImportError:
                consolidate_checkpoint = None
            if consolidate_checkpoint is None:
                log.warning("the best checkpoint %s is a sharded folder that cirlab cannot consolidate here: "
                            "export/ holds the LAST weights, not the best", best)
            else:
                state = {"state_dict": consolidate_checkpoint(best)}
                pl_module.load_state_dict(copy.copy(state["state_dict"]), strict=False)
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        # exports live in the run's log folder; with no logger there is no run folder: call export()
        if trainer.is_global_zero and log_dir and trainer.logger is not None:
            pl_module.export(Path(log_dir) / "export")
