"""Sharded checkpoints (FSDP `state_dict_type="sharded"`, DeepSpeed ZeRO) -> one plain state dict.

A run trained with a sharded strategy saves a *directory* per checkpoint, one part per rank.
`consolidate_checkpoint(path)` gathers it on CPU into the LightningModule's state dict (the keys
`state_dict` has in an ordinary checkpoint), so export writes the same safetensors whatever the
strategy. A plain checkpoint file passes through.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from cirlab.errors import CirlabError

log = logging.getLogger(__name__)


def _is_deepspeed_dir(path: Path) -> bool:
    return (path / "latest").is_file() or any(path.glob("*/mp_rank_*_model_states.pt")) or \
        any(path.glob("*/zero_pp_rank_*_optim_states.pt"))


def _is_dcp_dir(path: Path) -> bool:
    return (path / ".metadata").is_file()


def consolidate_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's full state dict from a checkpoint file, an FSDP sharded folder or a DeepSpeed folder."""
    p = Path(path)
    if p.is_file():
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        return ckpt["state_dict"] if "state_dict" in ckpt else ckpt
    if not p.is_dir():
        raise CirlabError(f"checkpoint {p} does not exist", "give a .ckpt file or a sharded checkpoint folder")
    if _is_dcp_dir(p):  # torch.distributed.checkpoint layout, written by Lightning's FSDPStrategy
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        full: dict[str, Any] = _load_distributed_checkpoint(p)
        model = full.get("model", full.get("state_dict"))
        if not isinstance(model, dict):
            raise CirlabError(f"{p} is a distributed checkpoint without model weights ('model' entry)",
                              "point at a folder saved by a cirlab/Lightning FSDP run")
        return {k: v for k, v in model.items() if isinstance(v, torch.Tensor)}
    if _is_deepspeed_dir(p):
        try:
            from lightning.pytorch.utilities.deepspeed import ds_checkpoint_dir
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as exn:
            raise CirlabError(f"{p} is a DeepSpeed checkpoint, and deepspeed is not installed",
                              "pip install 'cirlab[deepspeed]'") from exn
        tag = (p / "latest").read_text().strip() if (p / "latest").is_file() else None
        ds_dir = Path(ds_checkpoint_dir(p, tag))
        state = get_fp32_state_dict_from_zero_checkpoint(str(p), tag=ds_dir.name)
        # Lightning wraps the module: DeepSpeed's keys carry a "_forward_module." prefix
        return {k.removeprefix("_forward_module."): v for k, v in state.items()}
    raise CirlabError(f"{p} is a folder, but neither an FSDP (.metadata) nor a DeepSpeed (latest) checkpoint",
                      "give a .ckpt file or the checkpoint folder a sharded strategy wrote")


def read_checkpoint_any(path: str | Path) -> dict[str, Any]:
    """A Lightning-style checkpoint dict ("state_dict" plus cirlab's records) from a .ckpt file or a
    sharded folder: what `load_task_state` needs to put back an omitted frozen backbone."""
    p = Path(path)
    if p.is_file():
        from cirlab.train.checkpointing import read_checkpoint

        return read_checkpoint(p)
    meta: dict[str, Any] = {}
    if _is_dcp_dir(p) and (p / "meta.pt").is_file():
        meta = torch.load(p / "meta.pt", map_location="cpu", weights_only=True)
    elif _is_deepspeed_dir(p):
        # Lightning stores the checkpoint's other entries as DeepSpeed's client state
        states = sorted(p.glob("*/mp_rank_00_model_states.pt"))
        if states:
            try:
                full = torch.load(states[0], map_location="cpu", weights_only=True)
                meta = {k: v for k, v in full.items() if k.startswith("cirlab_") or k == "hyper_parameters"}
            except Exception as err:  # DeepSpeed's own records are not plain data: weights alone then
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
                log.warning("%s: cirlab records not readable with weights_only (%s); using the weights only",
                            states[0], first)
    return {**meta, "state_dict": consolidate_checkpoint(p)}
