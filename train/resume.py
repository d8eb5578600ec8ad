"""`cirlab fit --ckpt_path CKPT` continues the run's wandb id, as a SLURM requeue does (train/slurm.py).

The id is recorded in every checkpoint (`cirlab_wandb_id`, by save_task_state); before the CLI builds
the logger, a WandbLogger without an explicit `id`/`version` is given the one the checkpoint names.
Lightning creates the wandb run before it restores a checkpoint, so this cannot wait for the restore.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)


def saved_wandb_id(ckpt_path: str | Path) -> Optional[str]:
    """The wandb run id a cirlab checkpoint (file, or FSDP folder's meta.pt) records, else None."""
    p = Path(ckpt_path)
    if p.is_dir():
        p = p / "meta.pt"  # FSDP sharded folder; a DeepSpeed folder keeps it in its own client state
    if not p.is_file():
        return None
    try:  # mmap: only the small entries are read, not the weights
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # not ours to report here: Lightning's restore says what is wrong
        log.debug("no wandb id read from %s: %s", p, err)
        return None
    value = ckpt.get("cirlab_wandb_id") if isinstance(ckpt, dict) else None
    return str(value) if value else None


def continue_wandb_run(trainer_cfg: Any, ckpt_path: Any) -> Optional[str]:
    """Set the recipe's WandbLogger `id` from the checkpoint when the recipe gives none; returns it."""
    if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc", "registry"):
        return None
    loggers = trainer_cfg.get("logger") if hasattr(trainer_cfg, "get") else None
    if not loggers or isinstance(loggers, bool):
        return None
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if not str(getattr(logger, "class_path", "")).endswith("WandbLogger"):
            continue
        args = getattr(logger, "init_args", None)
        if args is None or args.get("id") or args.get("version"):
            return None  # the recipe (or the SLURM job) names the run itself
        run_id = saved_wandb_id(ckpt_path)
        if run_id:
            args["id"] = run_id
            log.warning("resuming %s: wandb continues run %s", ckpt_path, run_id)
        return run_id
    return None
