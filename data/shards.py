"""Writing WebDataset shards of any sample kind, with an index (count) file beside them."""

from __future__ import annotations

import io
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import webdataset as wds
from PIL import Image

from cirlab.data.kinds import IMAGE_FIELDS, REQUIRED_JSON, TEXT_FIELDS, check_kind

INDEX_NAME = "index.json"


@dataclass
class ShardIndex:
    """What a shard folder holds: its kind, its shards (relative names) and their sample counts."""

    kind: str
    shards: list[str]
    counts: list[int]
    root: Path = field(default=Path("."))

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def urls(self) -> list[str]:
        return [str(self.root / s) for s in self.shards]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "total": self.total,
                "shards": [{"name": s, "count": c} for s, c in zip(self.shards, self.counts)]}


def read_index(folder: str | os.PathLike) -> ShardIndex:
    """Read ``folder/index.json``; a missing folder or index fails with its path."""
    folder = Path(folder)
    path = folder / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no shard index at {path}: write shards there first (cirlab data …)")
    meta = json.loads(path.read_text())
    return ShardIndex(meta["kind"], [s["name"] for s in meta["shards"]],
                      [int(s["count"]) for s in meta["shards"]], folder)


def encode_image(img: Any, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """PIL image, raw encoded bytes, or a file path -> encoded bytes (bytes and files pass unchanged)."""
    if isinstance(img, (bytes, bytearray)):
        return bytes(img)
    if isinstance(img, (str, os.PathLike)):
        return Path(img).read_bytes()
    if isinstance(img, Image.Image):
        buf = io.BytesIO()
        if fmt == "png":
            img.save(buf, format="PNG")
        else:
            img.convert("RGB").save(buf, format="JPEG", quality=quality)
        return buf.getvalue()
    raise TypeError(f"cannot encode image of type {type(img).__name__}: give a PIL image, bytes or a path")


def _ext_for_bytes(data: bytes, ext: str) -> str:
    """Member extension that matches already-encoded bytes (PNG bytes go to .png, JPEG to .jpg)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ext.replace("jpg", "png")
    if data[:3] == b"\xff\xd8\xff":
        return ext.replace("png", "jpg")
    return ext


def sample_to_members(sample: dict[str, Any], kind: str, key: str, image_format: str = "jpeg") -> dict[str, Any]:
    """Turn a sample dict (field names as in DESIGN.md) into webdataset members for ``key``."""
    if "id" not in sample:
        raise KeyError(f"{kind} sample has no 'id' field")
    members: dict[str, Any] = {"__key__": key}
    meta: dict[str, Any] = {}
    for name, value in sample.items():
        if name in IMAGE_FIELDS[kind]:
            ext = IMAGE_FIELDS[kind][name]
            if image_format == "png":
                ext = ext.replace("jpg", "png")
            data = encode_image(value, "png" if image_format == "png" else "jpeg")
            members[_ext_for_bytes(data, ext)] = data
        elif name in TEXT_FIELDS[kind]:
            members[TEXT_FIELDS[kind][name]] = str(value)
        else:
            meta[name] = value
    missing = [f for f in list(IMAGE_FIELDS[kind]) + list(TEXT_FIELDS[kind]) + list(REQUIRED_JSON[kind])
               if f not in sample]
    if missing:
        raise KeyError(f"{kind} sample {sample['id']!r} lacks field(s) {missing}")
    members["json"] = json.dumps(meta).encode()
    return members


@contextmanager
def write_progress(what: str, total: Optional[int] = None, console: Any = None) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr while samples are written, shown on a terminal only (logs and CI stay
    clean); yields the function that counts one sample."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield lambda: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(what, total=total)
        yield lambda: bar.advance(task)


def write_shards(samples: Iterable[dict[str, Any]], out_dir: str | os.PathLike, kind: str,
                 maxcount: int = 1000, prefix: str = "shard", image_format: str = "jpeg",
                 total: Optional[int] = None, console: Any = None) -> ShardIndex:
    """Write samples of one kind into ``out_dir/{prefix}-NNNNNN.tar`` plus ``index.json``.

    Images may be PIL images, encoded bytes or file paths. Returns the index written. On a terminal a
    progress bar counts the samples, against ``total`` where the caller knows it.
    """
    check_kind(kind)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    counts: list[int] = []
    shard_no, in_shard, sink = -1, 0, None
    with write_progress(f"{kind} -> {out}", total, console) as advance:
        try:
            for i, sample in enumerate(samples):
                if sink is None or in_shard >= maxcount:
                    if sink is not None:
                        sink.close()
                    shard_no += 1
                    name = f"{prefix}-{shard_no:06d}.tar"
                    sink = wds.TarWriter(str(out / name), mtime=0)  # reproducible: no wall-clock stamps
                    names.append(name)
                    counts.append(0)
                    in_shard = 0
                sink.write(sample_to_members(sample, kind, f"{i:010d}", image_format))
                in_shard += 1
                counts[-1] += 1
                advance()
        finally:
            if sink is not None:
                sink.close()
    index = ShardIndex(kind, names, counts, out)
    (out / INDEX_NAME).write_text(json.dumps(index.to_json(), indent=1))
    return index
