"""Writing WebDataset shards of any sample kind, with an index (count) file beside them."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from PIL import Image

from cirlab.data.images import to_rgb
from cirlab.data.kinds import IMAGE_FIELDS, REQUIRED_JSON, TEXT_FIELDS, check_kind
from cirlab.data.tar_format import ShardTarWriter
from cirlab.errors import CirlabError

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


class ShardFolderError(CirlabError, FileNotFoundError):
    """A data folder that does not exist or holds no readable index.json (a FileNotFoundError too)."""


def read_index(folder: str | os.PathLike) -> ShardIndex:
    """Read ``folder/index.json``; a missing folder or index, or a damaged one, fails with its path."""
    folder = Path(folder)
    path = folder / INDEX_NAME
    if not folder.is_dir():
        raise ShardFolderError(f"data folder {folder} does not exist",
                               "check the path, or write shards there first (cirlab data convert …)")
    if not path.is_file():
        raise ShardFolderError(f"no shard index at {path}: {folder} is not a shard folder",
                               "write shards there with `cirlab data …`, or point at the folder holding index.json")
    try:
        meta = json.loads(path.read_text())
        return ShardIndex(meta["kind"], [s["name"] for s in meta["shards"]],
                          [int(s["count"]) for s in meta["shards"]], folder)
    except (ValueError, KeyError, TypeError) as exn:
        raise ShardFolderError(f"shard index {path} is damaged ({type(exn).__name__}: {exn})",
                               "write the shards again") from exn


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
        else:  # JPEG holds 8-bit RGB: a 16-bit image is scaled first, never clipped
            to_rgb(img).save(buf, format="JPEG", quality=quality)
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


def _missing_dirs(folder: Path) -> list[Path]:
    """The folders that mkdir(parents=True) would create for ``folder``, deepest first."""
    made = []
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    return made


def write_shards(samples: Iterable[dict[str, Any]], out_dir: str | os.PathLike, kind: str,
                 maxcount: int = 1000, prefix: str = "shard", image_format: str = "jpeg",
                 total: Optional[int] = None, console: Any = None) -> ShardIndex:
    """Write samples of one kind into ``out_dir/{prefix}-NNNNNN.tar`` plus ``index.json``.

    Images may be PIL images, encoded bytes or file paths. Returns the index written. On a terminal a
    progress bar counts the samples, against ``total`` where the caller knows it.

    All or nothing: shards are written into a hidden staging folder and moved into place with their
    index only once every sample is written. If ``samples`` raises (a bad row in strict mode, no
    samples at all, Ctrl-C), nothing of this call stays behind and an earlier shard set there is intact.
    """
    check_kind(kind)
    out = Path(out_dir)
    created = _missing_dirs(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=out))
    names: list[str] = []
    counts: list[int] = []
    shard_no, in_shard, sink = -1, 0, None
    try:
        with write_progress(f"{kind} -> {out}", total, console) as advance:
            try:
                for i, sample in enumerate(samples):
                    if sink is None or in_shard >= maxcount:
                        if sink is not None:
                            sink.close()
                        shard_no += 1
                        name = f"{prefix}-{shard_no:06d}.tar"
                        # webdataset.TarWriter's bytes, ~5x faster (data/tar_format.py); mtime 0: reproducible
                        sink = ShardTarWriter(str(staging / name), mtime=0)
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
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # only the folders this call made, and only if still empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    _publish(staging, out, names)
    index = ShardIndex(kind, names, counts, out)
    tmp_index = staging / INDEX_NAME
    tmp_index.write_text(json.dumps(index.to_json(), indent=1))
    os.replace(tmp_index, out / INDEX_NAME)
    staging.rmdir()
    return index


def _publish(staging: Path, out: Path, names: list[str]) -> None:
    """Move freshly written shards into ``out``; drop shards an earlier index listed that are not rewritten."""
    try:
        previous = set(read_index(out).shards) if (out / INDEX_NAME).is_file() else set()
    except ShardFolderError:
        previous = set()
    for name in names:
        os.replace(staging / name, out / name)
    for name in previous - set(names):
        if "/" not in name and ".." not in name:  # never delete outside the folder
            (out / name).unlink(missing_ok=True)
