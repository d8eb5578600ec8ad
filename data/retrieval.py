"""The data module of composed-retrieval tasks: training shards plus evaluation sets.

Each evaluation set becomes one loader: its gallery images, split over the ranks (each rank
encodes its share; the evaluation gathers them). Queries are json only and are read by the
evaluation itself (train/evaluation.py), so Lightning's batch limits (sanity check,
`limit_val_batches`) only ever shorten the gallery, which the evaluation reports.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from torch.utils.data import DataLoader, IterableDataset

from cirlab.data.datamodules import ShardDataModule
from cirlab.data.evalset import EvalSet, load_eval_set
from cirlab.data.streaming import ShardStream, as_batched
from cirlab.errors import CirlabError


class _GalleryStream(IterableDataset):
    """A gallery stream that yields nothing while the task keeps this gallery's features."""

    def __init__(self, stream: ShardStream) -> None:
        self.stream = stream
        self.needed = True

    def __iter__(self) -> Iterator[Any]:
        if self.needed:
            yield from self.stream


class RetrievalDataModule(ShardDataModule):
    """`train` shards of `kind` (triplet, pair, text, image, instruction) and evaluation-set folders.

    `val_sets` / `test_sets` are folders written by `cirlab data …` or the synthetic world.
    `val` (a shard folder of `val_kind`) is the plain alternative used by the CLIP pair task.
    """

    def __init__(self, train: Optional[str | list[str]] = None, kind: str = "triplet",
                 val_sets: Optional[list[str]] = None, test_sets: Optional[list[str]] = None,
                 batch_size: Optional[int] = None, eval_batch_size: int = 128, num_workers: int = 2,
                 resampled: bool = True, steps_per_epoch: Optional[int] = None,
                 weights: Optional[list[float]] = None, seed: int = 0, shuffle_buffer: int = 1000,
                 val: Optional[str] = None, val_kind: Optional[str] = None,
                 eval_num_workers: int = 0, global_batch_size: Optional[int] = None) -> None:
        super().__init__(train=train if train is not None else [], kind=kind, batch_size=batch_size,
                         num_workers=num_workers, resampled=resampled, steps_per_epoch=steps_per_epoch,
                         weights=weights, seed=seed, shuffle_buffer=shuffle_buffer, val=val,
                         val_kind=val_kind, val_batch_size=eval_batch_size, global_batch_size=global_batch_size)
        self.has_train = train is not None
        self.val_set_paths = list(val_sets or [])
        self.test_set_paths = list(test_sets or [])
        self.eval_batch_size = eval_batch_size
        self.eval_num_workers = eval_num_workers
        self.decode_images = True  # a task training from cached features turns this off
        self._sets: dict[str, list[EvalSet]] = {}
        self._gallery_streams: dict[tuple[str, int], _GalleryStream] = {}
        self._gallery_needed: dict[tuple[str, int], bool] = {}

    def setup(self, stage: str) -> None:
        # fail at the start of the run with the missing folder's name, not in the middle of it
        if stage in ("fit", "validate"):
            self.eval_sets("val")
        if stage == "test":
            self.eval_sets("test")

    def eval_sets(self, stage: str) -> list[EvalSet]:
        key = "test" if stage == "test" else "val"
        if key not in self._sets:
            paths = self.test_set_paths if key == "test" else self.val_set_paths
            self._sets[key] = [load_eval_set(p) for p in paths]
        return self._sets[key]

    # -- training
    def train_dataloader(self) -> DataLoader:
        if not self.has_train:
            raise CirlabError("the recipe's data section has no `train` shards", "set data.init_args.train")
        loader = super().train_dataloader()
        self.train_stream.decode_images = self.decode_images
        return loader

    def triplet_samples(self, transform: Optional[Callable] = None, rank: int = 0,
                        world_size: int = 1) -> Iterator[dict[str, Any]]:
        """One finite, unshuffled pass over the training samples (feature-cache filling); with
        ``world_size`` > 1, this rank's share (shards split between ranks, none seen twice)."""
        stream = ShardStream(self.train_source, self.kind, transform=transform, resampled=False, shuffle=False,
                             shuffle_buffer=0, batch_size=None, rank=rank, world_size=world_size, equal_steps=False)
        for sample in stream:
            sample.pop("__stream__", None)
            yield sample

    # -- evaluation
    def set_gallery_needed(self, stage: str, set_idx: int, needed: bool) -> None:
        """The task keeps (False) or needs (True) the gallery features of evaluation set `set_idx`."""
        self._gallery_needed[(stage, set_idx)] = needed
        stream = self._gallery_streams.get((stage, set_idx))
        if stream is not None:
            stream.needed = needed

    def _eval_loaders(self, stage: str) -> list[DataLoader]:
        rank, world = self._rank_world()
        loaders = []
        for i, es in enumerate(self.eval_sets(stage)):
            # each rank its share of the gallery shards (by sample when there are fewer shards than ranks)
            gallery = ShardStream(es.gallery.root, "image", transform=self.eval_transform, resampled=False,
                                  shuffle=False, shuffle_buffer=0, batch_size=self.eval_batch_size,
                                  rank=rank, world_size=world, equal_steps=False)
            wrapped = _GalleryStream(gallery)
            wrapped.needed = self._gallery_needed.get((stage, i), True)
            self._gallery_streams[(stage, i)] = wrapped
            loaders.append(DataLoader(wrapped, batch_size=None, num_workers=self.eval_num_workers,
                                      collate_fn=as_batched))
        return loaders

    def val_dataloader(self) -> Any:
        if self.val_set_paths:
            return self._eval_loaders("val")
        return super().val_dataloader()

    def test_dataloader(self) -> Any:
        if not self.test_set_paths:
            raise CirlabError("no test sets to evaluate on", "set data.init_args.test_sets to evaluation-set folders")
        return self._eval_loaders("test")
