"""The data module of composed-retrieval tasks: training shards plus evaluation sets.

Evaluation sets (cirlab.data.evalset) become two loaders each, gallery first, then queries
(Lightning runs validation loaders in order, so the gallery is indexed before its queries
arrive). Every rank evaluates every query: rankings are global, so nothing is split.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from torch.utils.data import DataLoader

from cirlab.data.datamodules import ShardDataModule
from cirlab.data.evalset import EvalSet, load_eval_set
from cirlab.data.streaming import ShardStream


class RetrievalDataModule(ShardDataModule):
    """`train` shards of `kind` (triplet, pair, text, image, instruction) and evaluation-set folders.

    `val_sets` / `test_sets` are folders written by `cirlab data …` or the synthetic world.
    `val` (a shard folder of `val_kind`) is the plain alternative used by the CLIP pair task.
    """

    def __init__(self, train: Optional[str | list[str]] = None, kind: str = "triplet",
                 val_sets: Optional[list[str]] = None, test_sets: Optional[list[str]] = None,
                 batch_size: int = 32, eval_batch_size: int = 128, num_workers: int = 2,
                 resampled: bool = True, steps_per_epoch: Optional[int] = None,
                 weights: Optional[list[float]] = None, seed: int = 0, shuffle_buffer: int = 1000,
                 val: Optional[str] = None, val_kind: Optional[str] = None,
                 eval_num_workers: int = 0) -> None:
        super().__init__(train=train if train is not None else [], kind=kind, batch_size=batch_size,
                         num_workers=num_workers, resampled=resampled, steps_per_epoch=steps_per_epoch,
                         weights=weights, seed=seed, shuffle_buffer=shuffle_buffer, val=val,
                         val_kind=val_kind, val_batch_size=eval_batch_size)
        self.has_train = train is not None
        self.val_set_paths = list(val_sets or [])
        self.test_set_paths = list(test_sets or [])
        self.eval_batch_size = eval_batch_size
        self.eval_num_workers = eval_num_workers
        self.decode_images = True  # a task training from cached features turns this off
        self._sets: dict[str, list[EvalSet]] = {}
        self._gallery_streams: dict[str, ShardStream] = {}

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
            raise ValueError("the recipe's data section has no `train` shards: set data.init_args.train")
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
    def skip_gallery_pixels(self, root: str) -> None:
        """The task holds this gallery's features (frozen image tower): stop decoding its images."""
        stream = self._gallery_streams.get(str(root))
        if stream is not None:
            stream.decode_images = False

    def _eval_loaders(self, sets: list[EvalSet]) -> list[DataLoader]:
        loaders = []
        for es in sets:
            gallery = ShardStream(es.gallery.root, "image", transform=self.eval_transform, resampled=False,
                                  shuffle=False, shuffle_buffer=0, batch_size=self.eval_batch_size,
                                  rank=0, world_size=1, equal_steps=False)
            self._gallery_streams[str(es.root)] = gallery
            queries = ShardStream(es.queries.root, "query", resampled=False, shuffle=False, shuffle_buffer=0,
                                  batch_size=self.eval_batch_size, rank=0, world_size=1, equal_steps=False,
                                  decode_images=False)  # the reference feature comes from the gallery
            for s in (gallery, queries):
                loaders.append(DataLoader(s, batch_size=None, num_workers=self.eval_num_workers))
        return loaders

    def val_dataloader(self) -> Any:
        if self.val_set_paths:
            return self._eval_loaders(self.eval_sets("val"))
        return super().val_dataloader()

    def test_dataloader(self) -> Any:
        if not self.test_set_paths:
            raise ValueError("no test sets: set data.init_args.test_sets to evaluation-set folders")
        return self._eval_loaders(self.eval_sets("test"))
