"""Streaming WebDataset shards for training and evaluation.

One ``ShardStream`` (an IterableDataset) reads tar shards with webdataset's tar iterator and
adds what distributed training needs and plain ``wds.WebDataset`` pipelines leave to the user:

* shards split explicitly over ranks and DataLoader workers ("slots"); with fewer shards than
  slots, every slot reads every shard and keeps every n-th sample instead;
* resampled (infinite, shards drawn with replacement) or finite (each shard once per pass);
* seeded shuffling (shard order + a sample buffer) that changes with the epoch and is reproducible;
* decode errors (corrupt member, truncated tar, undecodable image) logged once per shard and
  reason (then counted, with one summary line), counted in a counter shared with the workers
  (``stream.errors``) and skipped, never fatal; a shard set with 0 samples is a CirlabError;
* equal steps on every rank: an epoch is a fixed number of items (batches) per rank
  (``total // (world * batch_size)`` from index.json, or given); slots whose shards run out
  start another pass over them, slots with more data stop early;
* weighted mixing of several sources;
* a resumable position: every item carries ``__stream__`` metadata, the consumer hands the item
  to ``stream.observe`` (``StreamLoader`` and ``ShardDataModule`` do this), and
  ``state_dict`` / ``load_state_dict`` restart the stream right after the last observed item.
  The position of each slot is (shard visit, offset) per pool plus the references of the samples
  waiting in its shuffle buffer; every random choice is a hash of a counter, so a resume opens only
  the current shard and the few its buffer holds samples of, never the shards already finished
  (resampled mode replays no draw). With another number of ranks or workers, the epoch's unread
  shards are split over the new slots: no sample replayed; order differs (data/stream_resume.py).

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
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import braceexpand
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from cirlab.data.images import to_rgb
from cirlab.data.kinds import IMAGE_FIELDS, REQUIRED_JSON, TEXT_FIELDS, check_kind
from cirlab.data.shards import INDEX_NAME, read_index
from cirlab.data.stream_resume import assign, describe, split_items
from cirlab.data.tar_format import iter_tar_members
from cirlab.errors import CirlabError

log = logging.getLogger(__name__)

# Why a sample (or the rest of a shard) was skipped; "decoded" counts successful decodes.
REASONS = ("tar", "json", "missing", "image", "text")
_COLUMNS = REASONS + ("decoded", "opened")  # "opened": shard files opened (resume costs)
_MAX_SLOTS = 257  # row 0: main process; row 1 + w: DataLoader worker w
_MAX_WARNINGS = 20  # distinct (shard, reason) warnings per process; later errors are only counted
_STATE_FORMAT = 2  # position by (shard visit, offset) per slot


class StreamSourceError(CirlabError, ValueError):
    """Shards that cannot serve this stream (wrong kind); a ValueError too."""


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


_JPEG_MAGIC = b"\xff\xd8\xff"


def decode_pixels(data: bytes) -> torch.Tensor:
    """Encoded bytes -> (3, H, W) uint8 RGB pixels. JPEGs go through torchvision's decoder (the
    same libjpeg-turbo output as PIL's, 3x faster on small images); anything else, or a JPEG it
    refuses, through decode_image, whose DecodeError names what is wrong."""
    if data[:3] == _JPEG_MAGIC:
        try:
            from torchvision.io import ImageReadMode, decode_jpeg

            pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
            if pixels.shape[0] in (1, 3):  # grey or RGB; CMYK converts as PIL does, below
                return pixels.expand(3, -1, -1).contiguous()
        except RuntimeError:
            pass
    return torch.from_numpy(np.array(decode_image(data), dtype=np.uint8)).permute(2, 0, 1)


def decode_sample(raw: dict[str, Any], kind: str, transform: Callable | None = None,
                  decode_images: bool = True, pixels: bool = False) -> dict[str, Any]:
    """Raw tar members of one sample -> the sample dict with the field names of its kind.

    json fields are merged in, images become RGB PIL images (or ``transform(image)``, the same
    transform for ref and tgt), text members become str. Raises DecodeError on bad data.
    With decode_images=False the image fields are left out (tasks that read cached features); with
    pixels=True images are (3, H, W) uint8 tensors (decode_pixels) instead of PIL images.
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
        img = decode_pixels(data) if pixels else decode_image(data)
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
    source: str = ""  # what the user named (folders, patterns), for messages

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
                    raise FileNotFoundError(f"no shard folder or tar file at {url}: check the path, or write "
                                            "the shards first (`cirlab data convert`; the quickstart recipes' "
                                            "world: `cirlab data synthetic --out demo_out/world`)")
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
    named = ", ".join(os.fspath(i) for i in items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
    return ShardPool(urls, known, kinds.pop() if len(kinds) == 1 else None, named)


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
            if not pool.urls or pool.total == 0:
                raise CirlabError(f"the shard set {_where(pool)} is empty: it holds 0 samples",
                                  "convert data into it first (cirlab data convert), or point at another folder")
            if pool.kind is not None and pool.kind != kind:
                raise StreamSourceError(f"shards {pool.urls[0]} hold kind {pool.kind!r}, not {kind!r}: "
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

    @property
    def shards_opened(self) -> int:
        """How many shard files were opened (a resume opens the current shard and those its buffer needs)."""
        return self.stats.counts()["opened"]

    # -- position
    def _reset_position(self) -> None:
        self._items = 0  # items observed in this epoch
        # logical worker -> {"snap": its slot's position after its last observed item, "produced": items}
        self._pos: dict[int, dict[str, Any]] = {}
        self._workers: int | None = None
        self._loaded: dict[str, Any] | None = None  # a saved position this epoch resumes from
        self._plans: dict[int, dict[int, dict[str, Any]]] = {}  # num_workers -> logical worker -> start

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
        self._pos[meta["worker"]] = {"snap": meta["snap"], "produced": meta["items"]}
        self._items += 1
        if self.steps is not None and self._items >= self.steps:
            self.end_epoch()
        return item

    def end_epoch(self) -> None:
        """Move to the next epoch (called by observe at the quota, or by the loader at the end)."""
        self.epoch += 1
        self._reset_position()

    def state_dict(self, all_ranks: bool = True) -> dict[str, Any]:
        """Position: epoch, items, and per logical worker its slot's (shard visit, offset) per pool,
        mixing and shuffle-buffer state; gathers every rank's entry if distributed."""
        nw = self._workers
        starts = self._starts(nw) if nw is not None else {}
        pos = {}
        for w, start in starts.items():
            now = self._pos.get(w)
            pos[str(w)] = {"layout": start["layout"], "snap": now["snap"] if now else start["snap"],
                           "produced": now["produced"] if now else start["produced"]}
        local = {"format": _STATE_FORMAT, "epoch": self.epoch, "items": self._items, "workers": nw,
                 "pos": pos, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                 "resampled": self.resampled, "batch_size": self.batch_size}
        state: dict[str, Any] = {"ranks": {str(self.rank): local}, **local}
        if all_ranks and self.world_size > 1 and torch.distributed.is_available() \
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() == self.world_size:
            gathered: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, local)
            state["ranks"] = {str(s["rank"]): s for s in gathered}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position. With the same ranks and workers the order continues
        exactly; with other numbers the epoch's unread shards are split over the new slots
        (no sample replayed; order differs)."""
        if state.get("format") != _STATE_FORMAT:
            raise CirlabError("this stream position was saved by an older cirlab (it lacks per-shard offsets)",
                              "resume from a checkpoint saved at an epoch end, or restart the run")
        ranks = state.get("ranks") or {str(state.get("rank", 0)): state}
        old_world = int(state.get("world_size", 1))
        if len(ranks) != old_world:
            raise CirlabError(f"the stream position holds {len(ranks)} of the {old_world} ranks that saved it",
                              "save checkpoints with torch.distributed initialised on every rank")
        self.epoch = int(state["epoch"])
        self._reset_position()
        self._loaded = {"ranks": ranks, "world_size": old_world}
        items = int(state["items"])
        self._items = items if old_world == self.world_size else split_items(items, old_world, self.world_size)
        if self.steps is not None:
            self._items = min(self._items, self.steps)
        if self.seed != state.get("seed", self.seed):
            log.warning("stream seed changed from %s to %s: the resumed order will differ",
                        state.get("seed"), self.seed)
        if old_world != self.world_size:
            log.warning("resuming a stream saved on %s with %d rank(s): the epoch's unread shards are split "
                        "over the new ranks (no sample replayed; order differs)", describe(state), self.world_size)

    def _fresh_layout(self) -> dict[str, Any]:
        return {"units": [[] for _ in self.pools], "base": [0] * len(self.pools), "salt": ""}

    def _starts(self, nw: int) -> dict[int, dict[str, Any]]:
        """Where each logical worker of this rank starts this epoch with ``nw`` workers:
        {"layout", "snap" (None: the beginning), "produced"}; the same in workers and main process."""
        if nw in self._plans:
            return self._plans[nw]
        loaded = self._loaded
        mine = None if loaded is None else loaded["ranks"].get(str(self.rank))
        if loaded is None:
            plan = {w: {"layout": self._fresh_layout(), "snap": None, "produced": 0} for w in range(nw)}
        elif loaded["world_size"] == self.world_size and mine is not None and \
                (mine.get("workers") in (None, nw) or not mine.get("pos")):
            saved = mine.get("pos") or {}
            plan = {}
            for w in range(nw):
                e = saved.get(str(w))
                plan[w] = ({"layout": e["layout"], "snap": e["snap"], "produced": int(e["produced"])} if e else
                           {"layout": self._fresh_layout(), "snap": None,
                            "produced": len(range(w, self._items, nw))})
        else:
            plan = self._resplit(nw)
        self._plans[nw] = plan
        return plan

    def _resplit(self, nw: int) -> dict[int, dict[str, Any]]:
        """Unread first-pass work of every saved slot, split over this layout's slots."""
        assert self._loaded is not None
        work: list[tuple[int, list]] = []
        for r in sorted(self._loaded["ranks"], key=int):
            entry = self._loaded["ranks"][r]
            old_nw = entry.get("workers") or 1
            old_nslots = int(entry["world_size"]) * old_nw
            saved = entry.get("pos") or {}
            for w in range(old_nw):
                e = saved.get(str(w))
                slot = int(entry["rank"]) * old_nw + w
                layout = e["layout"] if e else self._fresh_layout()
                snap = e["snap"] if e else None
                work += _Slot.unread(self, slot, old_nslots, layout, snap)
        nslots = self.world_size * nw
        parts = assign(work, [p.counts for p in self.pools], nslots)
        log.warning("stream position saved with another layout: %d unread shard part(s) split over %d slot(s) "
                    "(no sample replayed; order differs)", len(work), nslots)
        plan = {}
        for w in range(nw):
            slot = self.rank * nw + w
            readers = [_PoolReader(self, p, slot, nslots, True, 0, self._fresh_layout(), None)
                       for p in range(len(self.pools))]
            base = [0 if self.resampled else len(rd.mine) for rd in readers]
            layout = {"units": parts[slot], "base": base, "salt": f"split{nslots}@{self._items}"}
            plan[w] = {"layout": layout, "snap": None, "produced": len(range(w, self._items, nw))}
        return plan

    # -- reading
    def _warn(self, reason: str, where: str, message: str, url: str | None = None) -> None:
        """Log a skipped sample or shard once per (shard, reason); later ones are counted and summed up."""
        warned = self.__dict__.setdefault("_warned", set())
        key = (url or where, reason)
        if key in warned or len(warned) >= _MAX_WARNINGS:
            self._quiet = getattr(self, "_quiet", 0) + 1
            return
        warned.add(key)
        log.warning("skipped %s (%s): %s", where, reason, message)

    def _warn_summary(self) -> None:
        quiet = getattr(self, "_quiet", 0)
        if quiet:
            log.warning("%d more skipped sample(s)/shard read(s) in shards already reported (counted in "
                        "stream.errors)", quiet)
            self._quiet = 0

    def _iter_shard(self, url: str, expected: int | None, row: int, report: bool) -> Iterator[tuple[int, dict[str, Any]]]:
        """(offset, raw sample) of one tar; a read error ends the shard, counted once."""
        current: dict[str, Any] | None = None
        seen = 0
        self.stats.add(row, "opened")
        try:
            with gopen(url, "rb") as stream:
                for fname, data in iter_tar_members(stream):  # tarfile's members, ~5x faster
                    prefix, suffix = base_plus_ext(fname)
                    if prefix is None:
                        continue
                    if current is not None and current["__key__"] != prefix:
                        seen += 1
                        yield seen - 1, current
                        current = None
                    if current is None:
                        current = {"__key__": prefix, "__url__": url, "__offset__": seen}
                    current[suffix.lower()] = data
            if current is not None:
                seen += 1
                yield seen - 1, current
                current = None
            if expected is not None and seen < expected and report:
                self.stats.add(row, "tar")
                self._warn("tar", url, f"shard ended after {seen} of {expected} samples (truncated?)", url)
        except Exception as exn:  # truncated or corrupt tar, unreadable file: the rest of the shard is lost
            if report:
                self.stats.add(row, "tar")
                key = f" near key {current['__key__']}" if current else ""
                self._warn("tar", url, f"unreadable after {seen} samples{key}: {type(exn).__name__}: {exn}", url)

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Decode one raw sample; a random image transform draws from a generator seeded by the
        sample itself (seed, epoch, shard file name, offset), so a resumed run augments exactly as an
        uninterrupted one, whatever the worker or rank layout or the folder the shards lie in."""
        if self.transform is None or not self.decode_images:
            return decode_sample(raw, self.kind, self.transform, self.decode_images)
        shard = os.path.basename(str(raw["__url__"]))
        if hasattr(self.transform, "defer"):
            # a batched transform (models/transforms.py): the sample's random draws now, from its own
            # generator; the pixel work for the whole batch in _finish_images
            rng = random.Random(_seed(self.seed, self.epoch, shard, raw.get("__offset__"), "defer"))
            defer = self.transform.defer
            return decode_sample(raw, self.kind, lambda px: defer(px, rng), self.decode_images, pixels=True)
        # the CPU generator only: torch.manual_seed also seeds every accelerator backend lazily, which
        # formats a stack trace per call (~3 ms a sample, a 10x slower CLIP epoch on 2 cores)
        gen = torch.default_generator
        state = gen.get_state()
        # the shard's file name, not its path: the same data in another folder augments the same
        # (the path made the demo's numbers depend on its --out folder)
        gen.manual_seed(_seed(self.seed, self.epoch, shard, raw.get("__offset__")) % 2 ** 63)
        try:
            return decode_sample(raw, self.kind, self.transform, self.decode_images)
        finally:
            gen.set_state(state)

    def _prepared(self, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self._finish_images(samples)
        return samples if self.prepare is None else self.prepare(samples)

    def _finish_images(self, samples: list[dict[str, Any]]) -> None:
        """A batched transform's pixel work, once per image field for the whole batch (in place)."""
        if not hasattr(self.transform, "defer") or not samples:
            return
        for name in IMAGE_FIELDS[self.kind]:
            if name in samples[0]:
                pixels = self.transform.finish([s[name] for s in samples])
                for s, p in zip(samples, pixels):
                    s[name] = p

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        nw, phys = (info.num_workers, info.id) if info is not None else (1, 0)
        if info is not None and hasattr(signal, "SIGUSR1"):
            # SLURM sends its requeue warning to every process of the job step; the training process
            # acts on it, a loader worker must not die of it (SIGUSR1's default action)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        # Rotate worker roles so the DataLoader's round robin (always starting at worker 0)
        # continues the interrupted order exactly.
        logical = (phys + self._items) % nw
        start = self._starts(nw)[logical]
        produced = start["produced"]
        slot, nslots = self.rank * nw + logical, self.world_size * nw
        quota = None if self.steps is None else len(range(logical, self.steps, nw))
        row = 0 if info is None else phys + 1
        cycle = self.steps is not None
        meta = {"stream": self._uid, "epoch": self.epoch, "worker": logical, "workers": nw}
        if quota is not None and produced >= quota:
            return
        reader = _Slot(self, slot, nslots, cycle, row, start["layout"], start["snap"])
        batch: list[dict[str, Any]] = []
        try:
            for raw in reader:
                try:
                    sample = self._decode(raw)
                except DecodeError as exn:
                    self.stats.add(row, exn.reason)
                    self._warn(exn.reason, f"sample {raw['__key__']} of {raw['__url__']}", str(exn), raw["__url__"])
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
                item["__stream__"] = dict(meta, snap=reader.snapshot(), items=produced)
                yield item
                if quota is not None and produced >= quota:
                    return
            if batch and self.partial and quota is None:
                item = collate(self._prepared(batch))
                item["__stream__"] = dict(meta, snap=reader.snapshot(), items=produced + 1)
                yield item
        finally:
            self._warn_summary()


# --------------------------------------------------------------------------- one slot's reading


PASS_END = ("pass-end",)  # a pool reader's marker: the slot's next pass over its shards begins


def _first_kept(start: int, step: int, rem: int, only: list[int] | None) -> int | None:
    """The first offset >= start that a visit keeps (None if an offset list has none left)."""
    if only is not None:
        left = [o for o in only if o >= start and o % step == rem]
        return min(left) if left else None
    return start + (rem - start) % step


class _PoolReader:
    """Raw samples of one pool for one slot, positioned by (shard visit u, offset in that shard).

    Visits are first the layout's ``units`` (work handed over by a re-split resume), then the
    regular visits from ``base``: finite mode walks the slot's shards pass by pass (a pass > 0
    reshuffled), resampled mode draws shard ``hash(seed, epoch, salt, slot, v) % n`` for visit v,
    so a resume replays no draw at all. A visit at or past a known count is skipped unopened.
    """

    def __init__(self, stream: "ShardStream", p: int, slot: int, nslots: int, cycle: bool, row: int,
                 layout: dict[str, Any], cur: Sequence[Any] | None) -> None:
        self.s, self.p, self.slot, self.nslots, self.cycle, self.row = stream, p, slot, nslots, cycle, row
        pool = stream.pools[p]
        self.pool, self.n = pool, len(pool.urls)
        self.units = [list(u) for u in layout["units"][p]]
        self.base, self.salt = int(layout["base"][p]), layout["salt"]
        u, off, got, empty, done = cur if cur is not None else (0, 0, False, 0, False)
        self.u, self.off, self.got, self.empty, self.done = int(u), int(off), bool(got), int(empty), bool(done)
        order = list(range(self.n))
        if stream.shuffle:  # same order on every slot, so the split stays a partition
            random.Random(_seed(stream.seed, stream.epoch, p, "order")).shuffle(order)
        self.order = order
        self.by_sample = self.n < nslots  # too few shards: every slot reads all, keeps every nslots-th sample
        self.mine = order if self.by_sample else order[slot::nslots]
        self._passes: dict[int, list[int]] = {0: self.mine}

    def state(self) -> list[Any]:
        return [self.u, self.off, self.got, self.empty, self.done]

    def _pass(self, k: int) -> list[int]:
        if k not in self._passes:
            seq = list(self.mine)
            if self.s.shuffle:
                random.Random(_seed(self.s.seed, self.s.epoch, self.salt, self.p, self.slot, k)).shuffle(seq)
            self._passes = {0: self.mine, k: seq}
        return self._passes[k]

    def first_pass(self, u: int) -> bool:
        """Whether visit u belongs to the epoch's first pass (handed-over units included)."""
        return u < len(self.units) or (not self.s.resampled and u - len(self.units) + self.base < len(self.mine))

    def visit(self, u: int) -> list | None:
        """The unit [shard, start, step, rem, only] that visit u reads; None past the last one."""
        if u < len(self.units):
            return self.units[u]
        v = u - len(self.units) + self.base
        if self.s.resampled:
            return [_seed(self.s.seed, self.s.epoch, self.salt, self.p, self.slot, "resample", v) % self.n,
                    0, 1, 0, None]
        if not self.mine:
            return None
        k, j = divmod(v, len(self.mine))
        if k and not self.cycle:
            return None
        i = self._pass(k)[j]
        if self.by_sample:
            return [i, 0, self.nslots, (self.slot + i) % self.nslots, None]
        return [i, 0, 1, 0, None]

    def _pass_boundary(self) -> bool:
        """At the start of a regular pass after a whole one with nothing readable: stop this slot."""
        if self.s.resampled or self.u < len(self.units) or not self.mine:
            return False
        v = self.u - len(self.units) + self.base
        if v % len(self.mine) or v == 0:
            return False
        whole = v - len(self.mine) >= self.base
        got, self.got = self.got, False
        if whole and not got:
            log.error("slot %d of %d has no readable samples in %s: it stops early", self.slot, self.nslots,
                      self.pool.urls[0])
            return True
        return False

    def _at_new_pass(self) -> bool:
        if self.s.resampled or not self.cycle or self.u < len(self.units) or not self.mine:
            return False
        v = self.u - len(self.units) + self.base
        return v > 0 and v % len(self.mine) == 0

    def read(self, unit: list, start: int, report: bool) -> Iterator[tuple[int, dict[str, Any]]]:
        """(offset, raw sample) that a unit keeps from ``start`` on."""
        i, ustart, step, rem, only = unit
        start = max(start, ustart)
        first = _first_kept(start, step, rem, only)
        count = None if self.pool.counts is None else self.pool.counts[i]
        if first is None or (count is not None and first >= count):
            return  # nothing left in this shard: not opened
        keep = None if only is None else set(only)
        for o, raw in self.s._iter_shard(self.pool.urls[i], count, self.row, report):
            if o >= start and o % step == rem and (keep is None or o in keep):
                yield o, raw

    def __iter__(self) -> Iterator[tuple[tuple[int, int, int], dict[str, Any]]]:
        while not self.done:
            if self.off == 0 and self._pass_boundary():
                self.done = True
                return
            unit = self.visit(self.u)
            if unit is None:
                self.done = True
                return
            if self.off == 0 and self._at_new_pass():
                yield PASS_END, {}  # the slot's buffer drains first: each pass is read exactly once
            # count a bad shard once: on the slot's first reading of it, by one slot of a shared shard
            report = self.off == 0 and (not self.by_sample or unit[0] % self.nslots == self.slot % self.nslots)
            got = False
            for o, raw in self.read(unit, self.off, report):
                self.off, got, self.got = o + 1, True, True
                yield (self.p, self.u, o), raw
            self.u, self.off = self.u + 1, 0
            if self.s.resampled:
                self.empty = 0 if got else self.empty + 1
                if self.empty > 10 * self.n + 10:
                    raise CirlabError(f"no readable samples in the {self.n} shard(s) of {_where(self.pool)}",
                                      "check the shards (cirlab data convert writes them) or point at others")

    def fetch(self, u: int, offsets: set[int]) -> dict[int, dict[str, Any]]:
        """The raw samples at these offsets of visit u (refilling a resumed shuffle buffer)."""
        unit = self.visit(u)
        if unit is None:
            return {}
        out: dict[int, dict[str, Any]] = {}
        i = unit[0]
        count = None if self.pool.counts is None else self.pool.counts[i]
        for o, raw in self.s._iter_shard(self.pool.urls[i], count, self.row, False):
            if o in offsets:
                out[o] = raw
                if len(out) == len(offsets):
                    break
        return out


class _Slot:
    """One slot's raw sample stream: its pools mixed by weight, through a seeded shuffle buffer.

    Every random choice is a hash of (seed, epoch, salt, slot, counter), so the position is a few
    counters plus the references (pool, visit, offset) of the samples waiting in the buffer.
    """

    def __init__(self, stream: "ShardStream", slot: int, nslots: int, cycle: bool, row: int,
                 layout: dict[str, Any], snap: dict[str, Any] | None) -> None:
        self.s, self.slot, self.salt = stream, slot, layout["salt"]
        pools = snap["pools"] if snap else [None] * len(stream.pools)
        self.readers = [_PoolReader(stream, p, slot, nslots, cycle, row, layout, pools[p])
                        for p in range(len(stream.pools))]
        self._iters = [iter(r) for r in self.readers]
        self.r, active = snap["mix"] if snap else (0, [i for i, w in enumerate(stream.weights) if w > 0])
        self.active = [int(a) for a in active]
        self.size = stream.shuffle_buffer
        self.e, self.flush, refs = snap["buf"] if snap else (0, False, [])
        self.buf: list[tuple[tuple[int, int, int], dict[str, Any]]] = self._refill(refs)

    def _refill(self, refs: list) -> list[tuple[tuple[int, int, int], dict[str, Any]]]:
        """Re-read the samples a saved buffer held: only the shards they lie in, and only up to them."""
        refs = [tuple(int(x) for x in r) for r in refs]
        need: dict[tuple[int, int], set[int]] = {}
        for p, u, o in refs:
            need.setdefault((p, u), set()).add(o)
        got = {(p, u): self.readers[p].fetch(u, offs) for (p, u), offs in sorted(need.items())}
        out = []
        for ref in refs:
            raw = got[ref[:2]].get(ref[2])
            if raw is None:
                self.s.stats.add(0, "tar")
                log.warning("resume: sample %d of shard visit %d is gone (shards changed since the checkpoint?)",
                            ref[2], ref[1])
                continue
            out.append((ref, raw))
        return out

    def snapshot(self) -> dict[str, Any]:
        return {"pools": [r.state() for r in self.readers], "mix": [self.r, list(self.active)],
                "buf": [self.e, self.flush, [ref for ref, _ in self.buf]]}

    def _hash(self, *parts: Any) -> int:
        return _seed(self.s.seed, self.s.epoch, self.salt, self.slot, *parts)

    def _next_raw(self) -> tuple[tuple[int, int, int], dict[str, Any]] | None:
        if len(self._iters) == 1:
            return next(self._iters[0], None)
        while self.active:  # (passes of mixed pools interleave: no pass ends here)
            x = self._hash("mix", self.r) / 2.0 ** 64
            self.r += 1
            weights = [self.s.weights[a] for a in self.active]
            acc, pick = 0.0, self.active[-1]
            for a, w in zip(self.active, weights):
                acc += w / sum(weights)
                if x < acc:
                    pick = a
                    break
            got = next(self._iters[pick], None)
            while got is not None and got[0] is PASS_END:
                got = next(self._iters[pick], None)
            if got is None:
                self.active.remove(pick)
                continue
            return got
        return None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        size = self.size
        if size <= 1:
            while (x := self._next_raw()) is not None:
                if x[0] is not PASS_END:
                    yield x[1]
            return
        while True:
            if self.flush:  # drain (shuffled) at a pass end or at the end of the data
                while self.buf:
                    yield self.buf.pop()[1]
                self.flush = False
                if self._exhausted():
                    return
            x = self._next_raw()
            if x is None or x[0] is PASS_END:
                if self.buf:
                    random.Random(self._hash("flush", self.e)).shuffle(self.buf)
                    self.flush = True
                elif x is None:
                    return
                continue
            if len(self.buf) < size:
                self.buf.append(x)
                continue
            j = self._hash("buffer", self.e) % size
            self.e += 1
            out, self.buf[j] = self.buf[j], x
            yield out[1]

    def _exhausted(self) -> bool:
        return self.readers[0].done if len(self.readers) == 1 else not self.active

    @staticmethod
    def unread(stream: "ShardStream", slot: int, nslots: int, layout: dict[str, Any],
               snap: dict[str, Any] | None) -> list[tuple[int, list]]:
        """(pool, unit) pairs a saved slot had not read yet in the epoch's first pass (its buffer
        included); in resampled mode the buffer and the rest of the current shard."""
        pools = snap["pools"] if snap else [None] * len(stream.pools)
        out: list[tuple[int, list]] = []
        readers = [_PoolReader(stream, p, slot, nslots, True, 0, layout, pools[p]) for p in range(len(stream.pools))]
        by_shard: dict[tuple[int, int], list[int]] = {}
        for p, u, o in (snap["buf"][2] if snap else []):
            rd = readers[int(p)]
            unit = rd.visit(int(u))
            if unit is not None and (stream.resampled or rd.first_pass(int(u))):
                by_shard.setdefault((int(p), unit[0]), []).append(int(o))
        for (p, i), offs in sorted(by_shard.items()):
            out.append((p, [i, 0, 1, 0, sorted(offs)]))
        for rd in readers:
            if rd.done:
                continue
            u, off = rd.u, rd.off
            if stream.resampled:
                unit = rd.visit(u)
                if off > 0 and unit is not None:
                    out.append((rd.p, [unit[0], max(off, unit[1]), unit[2], unit[3], unit[4]]))
                continue
            while rd.first_pass(u):
                unit = rd.visit(u)
                if unit is None:
                    break
                out.append((rd.p, [unit[0], max(off, unit[1]), unit[2], unit[3], unit[4]]))
                u, off = u + 1, 0
        return out


def _where(pool: ShardPool) -> str:
    """What the user named for a pool (its folder), or its first shard's folder, for messages."""
    if pool.source:
        return pool.source
    if pool.urls and _is_local(pool.urls[0]):
        return str(Path(pool.urls[0].removeprefix("file:")).parent)
    return pool.urls[0] if pool.urls else "(no shards)"


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def make_dataset(source: Any, kind: str, *, transform: Callable | None = None, resampled: bool = True,
                 shuffle_buffer: int = 1000, seed: int = 0, **kwargs: Any) -> ShardStream:
    """Build a ShardStream (see its arguments): the usual entry point for training and evaluation."""
    return ShardStream(source, kind, transform=transform, resampled=resampled,
                       shuffle_buffer=shuffle_buffer, seed=seed, **kwargs)


def as_batched(batch: Any) -> Any:
    """The DataLoader's `collate_fn` for a stream that batches itself: the batch as it is. The
    default for `batch_size=None`, `default_convert`, walks every batch for numpy arrays these
    streams never yield, the stream snapshot's thousands of entries included (4 ms a batch of 128
    on 2 cores, in the training process when the loader has no workers)."""
    return batch


class StreamLoader:
    """A DataLoader over a ShardStream that records each item it hands out (for state_dict)."""

    def __init__(self, stream: ShardStream, num_workers: int = 0, **loader_kwargs: Any) -> None:
        self.stream = stream
        loader_kwargs.setdefault("collate_fn", as_batched)
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, **loader_kwargs)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[Any]:
        epoch = self.stream.epoch
        for item in self.loader:
            yield self.stream.observe(item)
        if self.stream.steps is None and self.stream.epoch == epoch:  # finite stream ran out
            self.stream.end_epoch()
