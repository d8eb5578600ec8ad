"""LightningDataModules that stream shards (configurable from YAML through jsonargparse).

Loaders run with ``DataLoader(batch_size=None)`` over a ShardStream that batches inside each
worker (whole batches per worker keep the resumable position exact). The stream position is
recorded in ``on_before_batch_transfer`` (when a batch is about to be trained on, not when it was
prefetched) and saved in checkpoints through ``state_dict`` / ``load_state_dict``.
Workers are not persistent: each epoch's workers get the stream's current epoch and position.
Batch sizes: ``global_batch_size`` (the papers' number: samples per optimizer step over all devices)
or ``batch_size`` (per device); at most one of the two.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from cirlab.data.kinds import check_kind
from cirlab.errors import CirlabError
from cirlab.data.streaming import ShardStream, as_batched

DEFAULT_BATCH_SIZE = 32  # per device, when neither batch_size nor global_batch_size is set


def per_device_batch_size(global_batch_size: int, world_size: int, accumulate: int = 1) -> int:
    """The per-device batch that gives `global_batch_size` samples per optimizer step over
    `world_size` devices with `accumulate` gradient-accumulation steps."""
    share = world_size * accumulate
    if global_batch_size % share:
        raise CirlabError(f"global_batch_size {global_batch_size} does not divide over {world_size} device(s)"
                          f" x {accumulate} accumulation step(s) = {share}",
                          f"use a multiple of {share} (e.g. {max(share, global_batch_size // share * share)}), "
                          "or set batch_size (per device) instead")
    return global_batch_size // share


class ShardDataModule(pl.LightningDataModule):
    """Train (and optional validation) batches streamed from shard folders, tar lists or brace patterns.

    ``train`` is one source, or with ``weights`` a list of sources mixed by those weights
    (without weights a list is one pool of shards). The image transform comes from the model:
    the LightningModule calls ``set_transforms(train, eval)`` in its ``setup``.
    ``global_batch_size`` is divided by the world size (and gradient accumulation) when the
    loaders are made; ``batch_size`` is the per-device alternative.
    """

    def __init__(self, train: str | list[str], kind: str, batch_size: int | None = None, num_workers: int = 2,
                 resampled: bool = True, steps_per_epoch: int | None = None,
                 weights: list[float] | None = None, seed: int = 0, shuffle_buffer: int = 1000,
                 val: str | None = None, val_kind: str | None = None, val_batch_size: int | None = None,
                 prefetch_factor: int = 2, pin_memory: bool = False, global_batch_size: int | None = None) -> None:
        super().__init__()
        if batch_size is not None and global_batch_size is not None:
            raise CirlabError(f"the data section sets both batch_size ({batch_size}, per device) and "
                              f"global_batch_size ({global_batch_size}, all devices together)",
                              "keep one of the two; on the command line e.g. --data.init_args.global_batch_size=null "
                              "--data.init_args.batch_size=N")
        for name, value in (("batch_size", batch_size), ("global_batch_size", global_batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise CirlabError(f"data {name} must be a positive integer, got {value!r}")
        self.train_source = train
        self.kind = check_kind(kind)
        self.global_batch_size = global_batch_size
        # per device; with global_batch_size it is derived from the world size when the loaders are made
        self.batch_size = batch_size if batch_size is not None or global_batch_size is not None else DEFAULT_BATCH_SIZE
        self.num_workers = num_workers
        self.resampled = resampled
        self.steps_per_epoch = steps_per_epoch
        self.weights = weights
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.val_source = val
        self.val_kind = check_kind(val_kind or kind)
        self.val_batch_size = val_batch_size or self.batch_size  # None until derived, with global_batch_size
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.train_transform: Callable | None = None
        self.eval_transform: Callable | None = None
        self.train_stream: ShardStream | None = None
        self.val_stream: ShardStream | None = None
        self._pending_state: dict[str, Any] | None = None
        self.train_prepare: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None

    # -- transforms from the model
    def set_transforms(self, train_transform: Callable | None, eval_transform: Callable | None = None) -> None:
        """Use the model's image transforms (eval defaults to train's); applies to existing streams too."""
        self.train_transform = train_transform
        self.eval_transform = eval_transform if eval_transform is not None else train_transform
        if self.train_stream is not None:
            self.train_stream.transform = self.train_transform
        if self.val_stream is not None:
            self.val_stream.transform = self.eval_transform

    def set_train_prepare(self, prepare: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None) -> None:
        """A function over each training batch's samples, run in the loader workers (the model's
        per-sample work that needs no GPU, e.g. LinCIR's keyword masking)."""
        self.train_prepare = prepare
        if self.train_stream is not None:
            self.train_stream.prepare = prepare

    @property
    def transform(self) -> Callable | None:
        return self.train_transform

    @transform.setter
    def transform(self, value: Callable | None) -> None:
        self.set_transforms(value, self.eval_transform)

    # -- streams
    def _rank_world(self) -> tuple[int | None, int | None]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return None, None  # ShardStream falls back to torch.distributed

    def resolve_batch_size(self) -> int:
        """The per-device batch size: `batch_size`, or `global_batch_size` over the trainer's world
        size and gradient accumulation (torch.distributed's world size without a trainer)."""
        if self.global_batch_size is None:
            return self.batch_size
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            world, accumulate = trainer.world_size, trainer.accumulate_grad_batches
        else:
            import torch.distributed as dist
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            accumulate = 1
        self.batch_size = per_device_batch_size(self.global_batch_size, world, accumulate)
        if self.val_batch_size is None:
            self.val_batch_size = self.batch_size
        return self.batch_size

    def _loader(self, stream: ShardStream) -> DataLoader:
        extra = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=as_batched,
                          pin_memory=self.pin_memory, persistent_workers=False, **extra)

    def train_dataloader(self) -> DataLoader:
        if self.train_stream is None:
            rank, world = self._rank_world()
            self.train_stream = ShardStream(
                self.train_source, self.kind, transform=self.train_transform, resampled=self.resampled,
                shuffle_buffer=self.shuffle_buffer, seed=self.seed, batch_size=self.resolve_batch_size(),
                steps_per_epoch=self.steps_per_epoch, equal_steps=True, weights=self.weights,
                rank=rank, world_size=world, prepare=self.train_prepare)
            if self._pending_state is not None:
                self.train_stream.load_state_dict(self._pending_state)
                self._pending_state = None
        return self._loader(self.train_stream)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_source is None:
            return []
        if self.val_stream is None:
            rank, world = self._rank_world()
            # finite and unshuffled; several ranks need equal steps (no hang), which drops the remainder
            self.resolve_batch_size()
            self.val_stream = ShardStream(
                self.val_source, self.val_kind, transform=self.eval_transform, resampled=False,
                shuffle=False, batch_size=self.val_batch_size, rank=rank, world_size=world)
        return self._loader(self.val_stream)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the consumed batch in the stream position (strips its ``__stream__`` entry)."""
        # only the train position matters: validation restarts from its beginning every time
        if self.train_stream is not None:
            batch = self.train_stream.observe(batch)
        if isinstance(batch, dict):
            batch.pop("__stream__", None)
        return batch

    # -- checkpointed position
    def state_dict(self) -> dict[str, Any]:
        if self.train_stream is not None:
            return {"train": self.train_stream.state_dict()}
        return {"train": self._pending_state} if self._pending_state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        train = state_dict.get("train")
        if train is None:
            return
        if self.train_stream is not None:
            self.train_stream.load_state_dict(train)
        else:
            self._pending_state = train
