"""Streaming WebDataset shards for training and evaluation.

One ``ShardStream`` (an IterableDataset) reads tar shards with webdataset's tar iterator and
adds what distributed training needs and plain ``wds.WebDataset`` pipelines leave to the user:

* shards split explicitly over ranks and DataLoader workers ("slots"); with fewer shards than
  slots, every slot reads every shard and keeps every n-th sample instead;
* resampled (infinite, shards drawn with replacement) or finite (each shard once per pass);
* seeded shuffling (shard order + a sample buffer) that changes with the epoch and is reproducible;
* decode errors (corrupt member, truncated tar, undecodable image) logged, counted in a
  counter shared with the workers (``stream.errors``) and skipped, never fatal;
* equal steps on every rank: an epoch is a fixed number of items (batches) per rank
  (``total // (world * batch_size)`` from index.json, or given); slots whose shards run out
  start another pass over them, slots with more data stop early;
* weighted mixing of several sources;
* a resumable position: every item carries ``__stream__`` metadata, the consumer hands the item
  to ``stream.observe`` (``StreamLoader`` and ``ShardDataModule`` do this), and
  ``state_dict`` / ``load_state_dict`` restart the stream right after the last observed item.
  Resuming regenerates the raw (undecoded) sample order and drops consumed samples before decoding.

Batches are formed inside the stream (``batch_size``), so the DataLoader runs with
``batch_size=None``; each worker yields whole batches, which keeps the per-worker position exact.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import braceexpand
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from cirlab.data.images import to_rgb
from cirlab.data.kinds import IMAGE_FIELDS, REQUIRED_JSON, TEXT_FIELDS, check_kind
from cirlab.data.shards import INDEX_NAME, read_index

log = logging.getLogger(__name__)

# Why a sample (or the rest of a shard) was skipped; "decoded" counts successful decodes.
REASONS = ("tar", "json", "missing", "image", "text")
_COLUMNS = REASONS + ("decoded",)
_MAX_SLOTS = 257  # row 0: main process; row 1 + w: DataLoader worker w
_MAX_WARNINGS = 20  # per process; later errors are only counted


class DecodeError(Exception):
    """A sample that cannot be decoded; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------- decoding

_IMAGE_ALTERNATIVES = ("jpg", "png", "jpeg", "webp")


def _image_member(raw: dict[str, Any], ext: str) -> bytes | None:
    """Find an image member whatever the format it was written in (jpg, png, ...)."""
    stem = ext.rsplit("jpg", 1)[0]  # "ref.jpg" -> "ref.", "jpg" -> ""
    for alt in _IMAGE_ALTERNATIVES:
        if stem + alt in raw:
            return raw[stem + alt]
    return None


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> fully loaded RGB PIL image (raises DecodeError("image") if it cannot)."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return to_rgb(img)  # 16-bit images scaled to 8 bits, not clipped; no copy for RGB JPEGs
    except Exception as exn:  # PIL raises many types for broken data
        raise DecodeError("image", f"undecodable image ({type(exn).__name__}: {exn})") from exn


def decode_sample(raw: dict[str, Any], kind: str, transform: Callable | None = None,
                  decode_images: bool = True) -> dict[str, Any]:
    """Raw tar members of one sample -> the sample dict with the field names of its kind.

    json fields are merged in, images become RGB PIL images (or ``transform(image)``, the same
    transform for ref and tgt), text members become str. Raises DecodeError on bad data.
    With decode_images=False the image fields are left out (tasks that read cached features).
    """
    check_kind(kind)
    if "json" not in raw:
        raise DecodeError("missing", "no json member")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as exn:
        raise DecodeError("json", f"corrupt json member ({exn})") from exn
    if not isinstance(meta, dict):
        raise DecodeError("json", f"json member is a {type(meta).__name__}, not an object")
    out: dict[str, Any] = dict(meta)
    for name in ("id",) + REQUIRED_JSON[kind]:
        if name not in out:
            raise DecodeError("missing", f"json member lacks {name!r}")
    for name, ext in TEXT_FIELDS[kind].items():
        data = raw.get(ext)
        if data is None:
            raise DecodeError("missing", f"no {ext} member")
        try:
            out[name] = data.decode("utf-8")
        except UnicodeDecodeError as exn:
            raise DecodeError("text", f"{ext} member is not UTF-8 ({exn})") from exn
    for name, ext in IMAGE_FIELDS[kind].items() if decode_images else ():
        data = _image_member(raw, ext)
        if data is None:
            raise DecodeError("missing", f"no {ext} member")
        img = decode_image(data)
        out[name] = transform(img) if transform is not None else img
    return out


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> batch: tensors of equal shape stacked, everything else as lists (None if absent)."""
    keys: dict[str, None] = {}
    for s in samples:
        keys.update(dict.fromkeys(s))
    batch: dict[str, Any] = {}
    for k in keys:
        values = [s.get(k) for s in samples]
        if all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
            batch[k] = default_collate(values)  # in a worker it stacks straight into shared memory
        else:
            batch[k] = values
    return batch


# --------------------------------------------------------------------------- sources


@dataclass
class ShardPool:
    """One source: its shard urls and, when an index.json lists them, their sample counts."""

    urls: list[str]
    counts: list[int] | None
    kind: str | None = None

    @property
    def total(self) -> int | None:
        return None if self.counts is None else sum(self.counts)


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _index_counts(folder: Path, cache: dict[Path, dict[str, int] | None]) -> dict[str, int] | None:
    """name -> count from folder/index.json (None when there is no index)."""
    if folder not in cache:
        if (folder / INDEX_NAME).is_file():
            idx = read_index(folder)
            cache[folder] = dict(zip(idx.shards, idx.counts))
            cache[folder]["__kind__"] = idx.kind  # type: ignore[assignment]
        else:
            cache[folder] = None
    return cache[folder]


def resolve_source(source: str | os.PathLike | Sequence[str | os.PathLike]) -> ShardPool:
    """A shard folder (with index.json), a tar path, a brace pattern or a list of these -> one pool.

    Missing local shards fail here, naming the path.
    """
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise ValueError("empty shard source: give a shard folder, tar paths or a brace pattern")
    urls: list[str] = []
    counts: list[int | None] = []
    kinds: set[str] = set()
    cache: dict[Path, dict[str, int] | None] = {}
    for item in items:
        s = os.fspath(item)
        if _is_local(s) and os.path.isdir(s):
            idx = read_index(s)
            kinds.add(idx.kind)
            urls += idx.urls
            counts += idx.counts
            continue
        for url in braceexpand.braceexpand(s):
            if _is_local(url):
                path = Path(url.removeprefix("file:"))
                if not path.is_file():
                    raise FileNotFoundError(f"shard {url} does not exist: check the path, or write the "
                                            f"shards first (cirlab data convert)")
                meta = _index_counts(path.parent, cache)
                if meta is not None and "__kind__" in meta:
                    kinds.add(str(meta["__kind__"]))
                counts.append(None if meta is None else meta.get(path.name))
            else:
                counts.append(None)
            urls.append(url)
    for url in urls:
        if _is_local(url) and not Path(url.removeprefix("file:")).is_file():
            raise FileNotFoundError(f"shard {url} listed in its index.json does not exist: rewrite the shards")
    known = None if any(c is None for c in counts) else [int(c) for c in counts]  # type: ignore[arg-type]
    return ShardPool(urls, known, kinds.pop() if len(kinds) == 1 else None)


# --------------------------------------------------------------------------- shared counters


class StreamStats:
    """Error and decode counters in shared memory, readable in the main process after a run.

    Each process writes its own row (main process row 0, worker w row w + 1), so no lock is needed.
    """

    def __init__(self) -> None:
        self.table = torch.zeros(_MAX_SLOTS, len(_COLUMNS), dtype=torch.int64).share_memory_()

    def add(self, row: int, column: str, n: int = 1) -> None:
        self.table[row % _MAX_SLOTS, _COLUMNS.index(column)] += n

    def counts(self) -> dict[str, int]:
        sums = self.table.sum(0).tolist()
        return {c: int(v) for c, v in zip(_COLUMNS, sums)}

    def reset(self) -> None:
        self.table.zero_()


def _seed(*parts: Any) -> int:
    """A 64-bit seed from any parts (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _shuffle_buffer(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle: keep ``size`` items, emit a random one for every new one."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = x
    rng.shuffle(buf)
    yield from buf


# --------------------------------------------------------------------------- the stream


class ShardStream(IterableDataset):
    """Shards of one kind (or a weighted mix of sources) as an IterableDataset; see the module doc.

    Items are batches (``collate``) when ``batch_size`` is set, else single samples, each with a
    ``__stream__`` entry that ``observe`` removes. Use with ``DataLoader(batch_size=None)``.
    """

    def __init__(self, source: Any, kind: str, *, transform: Callable | None = None,
                 resampled: bool = True, shuffle: bool = True, shuffle_buffer: int = 1000, seed: int = 0,
                 batch_size: int | None = None, steps_per_epoch: int | None = None,
                 equal_steps: bool | None = None, weights: Sequence[float] | None = None,
                 rank: int | None = None, world_size: int | None = None, partial: bool = True,
                 decode_images: bool = True,
                 prepare: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None) -> None:
        self.kind = check_kind(kind)
        self.decode_images = decode_images
        # runs on each batch's decoded samples inside the loader workers, before collation
        # (LinCIR masks captions there, off the training loop)
        self.prepare = prepare
        if weights is not None:
            if isinstance(source, (str, os.PathLike)) or len(source) != len(weights):
                raise ValueError("weights need one source per weight: give a list of sources as long as weights")
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"mixing weights must be >= 0 with a positive sum, got {list(weights)}")
            self.pools = [resolve_source(s) for s in source]
            self.weights = [float(w) for w in weights]
        else:
            self.pools = [resolve_source(source)]
            self.weights = [1.0]
        for pool in self.pools:
            if pool.kind is not None and pool.kind != kind:
                raise ValueError(f"shards {pool.urls[0]} hold kind {pool.kind!r}, not {kind!r}: "
                                 f"pass kind={pool.kind!r} or point at other shards")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.transform = transform
        self.resampled = resampled
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.seed = seed
        self.batch_size = batch_size
        self.partial = partial
        if rank is None or world_size is None:
            d_rank, d_world = _dist_rank_world()
            rank = d_rank if rank is None else rank
            world_size = d_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.rank, self.world_size = rank, world_size
        if equal_steps is None:  # infinite streams and multi-rank training need a fixed epoch
            equal_steps = resampled or world_size > 1
        self.steps = self._epoch_steps(steps_per_epoch, equal_steps)
        self.stats = StreamStats()
        self._uid = uuid.uuid4().hex
        self.epoch = 0
        self._reset_position()

    # -- sizing
    def _epoch_steps(self, steps: int | None, equal: bool) -> int | None:
        if steps is not None:
            if steps < 1:
                raise ValueError(f"steps_per_epoch must be >= 1, got {steps}")
            return steps
        if not equal:
            return None
        totals = [p.total for p in self.pools]
        if any(t is None for t in totals):
            raise ValueError("cannot size an epoch: some shards have no index.json with counts; "
                             "give steps_per_epoch, or use shard folders written by cirlab")
        per = self.world_size * (self.batch_size or 1)
        return max(1, sum(totals) // per)  # type: ignore[arg-type]

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("this finite stream has no fixed length (equal_steps=False)")
        return self.steps

    # -- errors
    @property
    def errors(self) -> dict[str, int]:
        """Skipped samples/shard reads by reason, summed over the main process and all workers."""
        counts = self.stats.counts()
        return {r: counts[r] for r in REASONS}

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def decoded(self) -> int:
        """How many samples were decoded (resume skips samples without decoding them)."""
        return self.stats.counts()["decoded"]

    # -- position
    def _reset_position(self) -> None:
        self._items = 0  # items observed in this epoch
        self._pos: dict[int, tuple[int, int]] = {}  # logical worker -> (raw consumed, items)
        self._workers: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (a new shuffle); setting the current epoch keeps the position."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._reset_position()

    def observe(self, item: Any) -> Any:
        """Record that ``item`` was consumed and strip its metadata; returns the item."""
        meta = item.pop("__stream__", None) if isinstance(item, dict) else None
        if meta is None or meta["stream"] != self._uid or meta["epoch"] != self.epoch:
            return item
        self._workers = meta["workers"]
        self._pos[meta["worker"]] = (meta["raw"], meta["items"])
        self._items += 1
        if self.steps is not None and self._items >= self.steps:
            self.end_epoch()
        return item

    def end_epoch(self) -> None:
        """Move to the next epoch (called by observe at the quota, or by the loader at the end)."""
        self.epoch += 1
        self._reset_position()

    def state_dict(self, all_ranks: bool = True) -> dict[str, Any]:
        """Position (epoch, items, per-worker raw samples consumed); gathers every rank's if distributed."""
        local = {"epoch": self.epoch, "items": self._items, "workers": self._workers,
                 "pos": {str(k): list(v) for k, v in self._pos.items()}, "seed": self.seed,
                 "rank": self.rank, "world_size": self.world_size}
        state: dict[str, Any] = {"ranks": {str(self.rank): local}, **local}
        if all_ranks and self.world_size > 1 and torch.distributed.is_available() \
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() == self.world_size:
            gathered: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, local)
            state["ranks"] = {str(s["rank"]): s for s in gathered}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position: this rank's entry if present, else the top-level one."""
        if state.get("world_size", self.world_size) != self.world_size:
            raise ValueError(f"stream state was saved with world_size {state['world_size']}, this run has "
                             f"{self.world_size}: resume with the same number of ranks")
        mine = state.get("ranks", {}).get(str(self.rank))
        if mine is None:
            log.warning("stream state has no entry for rank %d; using rank %s's position", self.rank,
                        state.get("rank"))
            mine = state
        self.epoch = int(mine["epoch"])
        self._items = int(mine["items"])
        self._workers = mine.get("workers")
        self._pos = {int(k): (int(v[0]), int(v[1])) for k, v in mine.get("pos", {}).items()}
        if self.seed != state.get("seed", self.seed):
            log.warning("stream seed changed from %s to %s: the resumed order will differ",
                        state.get("seed"), self.seed)

    # -- reading
    def _warn(self, reason: str, where: str, message: str) -> None:
        self._warned = getattr(self, "_warned", 0) + 1
        if self._warned <= _MAX_WARNINGS:
            log.warning("skipped %s (%s): %s", where, reason, message)
        elif self._warned == _MAX_WARNINGS + 1:
            log.warning("more shard errors: counted in stream.errors, no longer logged")

    def _iter_shard(self, url: str, expected: int | None, row: int, report: bool) -> Iterator[dict[str, Any]]:
        """Raw samples (member bytes by extension) of one tar; a read error ends the shard, counted once."""
        current: dict[str, Any] | None = None
        seen = 0
        try:
            with gopen(url, "rb") as stream:
                for f in tar_file_iterator(stream):
                    prefix, suffix = base_plus_ext(f["fname"])
                    if prefix is None:
                        continue
                    if current is not None and current["__key__"] != prefix:
                        seen += 1
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": prefix, "__url__": url}
                    current[suffix.lower()] = f["data"]
            if current is not None:
                seen += 1
                yield current
                current = None
            if expected is not None and seen < expected and report:
                self.stats.add(row, "tar")
                self._warn("tar", url, f"shard ended after {seen} of {expected} samples (truncated?)")
        except Exception as exn:  # truncated or corrupt tar, unreadable file: the rest of the shard is lost
            if report:
                self.stats.add(row, "tar")
                key = f" near key {current['__key__']}" if current else ""
                self._warn("tar", url, f"unreadable after {seen} samples{key}: {type(exn).__name__}: {exn}")

    def _pool_stream(self, p: int, slot: int, nslots: int, cycle: bool, row: int) -> Iterator[dict[str, Any]]:
        """Raw samples of pool p for one slot (rank x logical worker)."""
        pool = self.pools[p]
        n = len(pool.urls)
        count = (lambda i: None) if pool.counts is None else (lambda i: pool.counts[i])  # noqa: E731
        if self.resampled:
            rng = random.Random(_seed(self.seed, self.epoch, p, slot, "resample"))
            empty = 0
            while True:
                i = rng.randrange(n)
                got = False
                for raw in self._iter_shard(pool.urls[i], count(i), row, True):
                    got = True
                    yield raw
                empty = 0 if got else empty + 1
                if empty > 10 * n + 10:
                    raise RuntimeError(f"no readable samples in {n} shard(s) starting {pool.urls[0]}")
        order = list(range(n))
        if self.shuffle:  # same order on every slot, so the split stays a partition
            random.Random(_seed(self.seed, self.epoch, p, "order")).shuffle(order)
        by_sample = n < nslots  # too few shards: every slot reads all, keeps every nslots-th sample
        mine = order if by_sample else order[slot::nslots]
        passes = 0
        while True:
            seq = list(mine)
            if passes and self.shuffle:
                random.Random(_seed(self.seed, self.epoch, p, slot, passes)).shuffle(seq)
            got = False
            c = 0
            for i in seq:
                report = not by_sample or order.index(i) % nslots == slot  # count a bad shard once
                for raw in self._iter_shard(pool.urls[i], count(i), row, report):
                    c += 1
                    if by_sample and (c - 1) % nslots != slot:
                        continue
                    got = True
                    yield raw
            passes += 1
            if not cycle:
                return
            if not got:
                log.error("slot %d of %d has no readable samples in %s: it stops early", slot, nslots,
                          pool.urls[0])
                return

    def _raw_stream(self, slot: int, nslots: int, cycle: bool, row: int) -> Iterator[dict[str, Any]]:
        """Raw samples of all pools, mixed by weight with a seeded choice per sample."""
        streams = [self._pool_stream(p, slot, nslots, cycle, row) for p in range(len(self.pools))]
        if len(streams) == 1:
            yield from streams[0]
            return
        rng = random.Random(_seed(self.seed, self.epoch, slot, "mix"))
        active = [i for i, w in enumerate(self.weights) if w > 0]
        while active:
            i = rng.choices(active, weights=[self.weights[a] for a in active])[0]
            try:
                yield next(streams[i])
            except StopIteration:
                active.remove(i)

    def _prepared(self, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return samples if self.prepare is None else self.prepare(samples)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        nw, phys = (info.num_workers, info.id) if info is not None else (1, 0)
        if self._workers is not None and self._pos and self._workers != nw:
            raise ValueError(f"stream position was saved with {self._workers} DataLoader workers, this run "
                             f"has {nw}: resume with the same num_workers")
        # Rotate worker roles so the DataLoader's round robin (always starting at worker 0)
        # continues the interrupted order exactly.
        logical = (phys + self._items) % nw
        raw_done, produced = self._pos.get(logical, (0, 0))
        slot, nslots = self.rank * nw + logical, self.world_size * nw
        quota = None if self.steps is None else len(range(logical, self.steps, nw))
        row = 0 if info is None else phys + 1
        cycle = self.steps is not None
        raw_iter = _shuffle_buffer(self._raw_stream(slot, nslots, cycle, row), self.shuffle_buffer,
                                   random.Random(_seed(self.seed, self.epoch, slot, "buffer")))
        meta = {"stream": self._uid, "epoch": self.epoch, "worker": logical, "workers": nw}
        consumed = 0
        batch: list[dict[str, Any]] = []
        if quota is not None and produced >= quota:
            return
        for raw in raw_iter:
            consumed += 1
            if consumed <= raw_done:  # already used before the restart: skip without decoding
                continue
            try:
                sample = decode_sample(raw, self.kind, self.transform, self.decode_images)
            except DecodeError as exn:
                self.stats.add(row, exn.reason)
                self._warn(exn.reason, f"sample {raw['__key__']} of {raw['__url__']}", str(exn))
                continue
            self.stats.add(row, "decoded")
            if self.batch_size is None:
                item = self._prepared([sample])[0]
            else:
                batch.append(sample)
                if len(batch) < self.batch_size:
                    continue
                item, batch = collate(self._prepared(batch)), []
            produced += 1
            item["__stream__"] = dict(meta, raw=consumed, items=produced)
            yield item
            if quota is not None and produced >= quota:
                return
        if batch and self.partial and quota is None:
            item = collate(self._prepared(batch))
            item["__stream__"] = dict(meta, raw=consumed, items=produced + 1)
            yield item


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def make_dataset(source: Any, kind: str, *, transform: Callable | None = None, resampled: bool = True,
                 shuffle_buffer: int = 1000, seed: int = 0, **kwargs: Any) -> ShardStream:
    """Build a ShardStream (see its arguments): the usual entry point for training and evaluation."""
    return ShardStream(source, kind, transform=transform, resampled=resampled,
                       shuffle_buffer=shuffle_buffer, seed=seed, **kwargs)


class StreamLoader:
    """A DataLoader over a ShardStream that records each item it hands out (for state_dict)."""

    def __init__(self, stream: ShardStream, num_workers: int = 0, **loader_kwargs: Any) -> None:
        self.stream = stream
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, **loader_kwargs)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[Any]:
        epoch = self.stream.epoch
        for item in self.loader:
            yield self.stream.observe(item)
        if self.stream.steps is None and self.stream.epoch == epoch:  # finite stream ran out
            self.stream.end_epoch()
