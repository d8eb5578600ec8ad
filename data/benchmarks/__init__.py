"""Benchmark readers: FashionIQ, CIRR and CIRCO from their official file layouts to cirlab shards.

Each converter writes, under one output folder::

    triplets/train/            training triplets (kind triplet), where the benchmark has them
    eval/<split>[/<category>]/ evaluation sets (data/evalset.py layout: protocol, queries, gallery)
    report.json, missing.txt   what was written, what was skipped and which images were missing

Missing images are reported, never fatal: a gallery leaves them out, and a query or triplet whose
reference or target image is missing is skipped and counted.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from cirlab.data.evalset import EvalSet, Protocol
from cirlab.data.images import to_rgb
from cirlab.data.shards import INDEX_NAME, ShardIndex, read_index, write_shards

BENCHMARKS = ("fashioniq", "cirr", "circo")


@dataclass
class ConversionReport:
    """What a benchmark conversion wrote and skipped; saved as report.json (+ missing.txt)."""

    benchmark: str
    out_dir: Path
    written: dict[str, int] = field(default_factory=dict)   # part -> samples written
    skipped: dict[str, int] = field(default_factory=dict)   # reason -> count (queries/triplets dropped)
    missing: list[str] = field(default_factory=list)        # image files that were not found
    notes: dict[str, int] = field(default_factory=dict)     # kept but worth knowing -> count

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def note(self, what: str, n: int = 1) -> None:
        self.notes[what] = self.notes.get(what, 0) + n

    def to_json(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "written": self.written, "skipped": self.skipped,
                "notes": self.notes, "missing_images": len(set(self.missing))}

    def save(self) -> None:
        """Write report.json and missing.txt (one path per line; empty when nothing is missing)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "report.json").write_text(json.dumps(self.to_json(), indent=1))
        (self.out_dir / "missing.txt").write_text("".join(f"{m}\n" for m in sorted(set(self.missing))))

    def summary(self) -> str:
        lines = [f"{self.benchmark} -> {self.out_dir}"]
        lines += [f"  wrote {k}: {v}" for k, v in self.written.items()]
        lines += [f"  skipped ({k}): {v}" for k, v in self.skipped.items()]
        lines += [f"  note ({k}): {v}" for k, v in self.notes.items()]
        if self.missing:
            lines.append(f"  {len(set(self.missing))} image(s) missing, listed in {self.out_dir / 'missing.txt'}")
        return "\n".join(lines)


def load_json(path: Path, what: str) -> Any:
    """Read an official json file; a missing or malformed one fails with its path and what it should be."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path}: check --root (see the benchmark's official layout)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid json ({e}); re-download the benchmark's {what}") from e


def image_bytes(path: Path, image_format: str) -> bytes:
    """The file's bytes when its format already matches the shard member; else decoded and re-encoded."""
    want_png = image_format == "png"
    is_png = path.suffix.lower() == ".png"
    data = path.read_bytes()
    if want_png == is_png:
        return data
    img = Image.open(io.BytesIO(data))
    buf = io.BytesIO()
    if want_png:
        img.save(buf, format="PNG")
    else:
        to_rgb(img).save(buf, format="JPEG", quality=95)  # 16-bit sources scaled, not clipped
    return buf.getvalue()


def exists(path: Path) -> bool:
    """An image counts as present when the file exists and is not empty (failed downloads leave 0 bytes)."""
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def write_eval(out_dir: Path, protocol: Protocol, queries: Iterable[dict[str, Any]],
               gallery: Iterable[dict[str, Any]] | ShardIndex, maxcount: int,
               image_format: str = "jpeg") -> EvalSet:
    """``evalset.write_eval_set`` with the image member format chosen (CIRR's PNGs stay PNG) and an
    optional shared gallery: given a ShardIndex, the set's gallery index points at those shards
    instead of copying them (CIRCO's 123k-image gallery serves val and test)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    gdir = out_dir / "gallery"
    if isinstance(gallery, ShardIndex):
        gdir.mkdir(parents=True, exist_ok=True)
        rel = Path(os.path.relpath(gallery.root, gdir))
        shared = ShardIndex(gallery.kind, [str(rel / s) for s in gallery.shards], gallery.counts, gdir)
        (gdir / INDEX_NAME).write_text(json.dumps(shared.to_json(), indent=1))
        g = read_index(gdir)
    else:
        g = write_shards(gallery, gdir, "image", maxcount=maxcount, image_format=image_format)
    q = write_shards(queries, out_dir / "queries", "query", maxcount=maxcount, image_format=image_format)
    (out_dir / "protocol.json").write_text(json.dumps(protocol.to_json(), indent=1))
    return EvalSet(out_dir, protocol, q, g)


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(s for s in text.replace(",", " ").split() if s)


_DEFAULT_SPLITS = {"fashioniq": "train,val", "cirr": "train,val,test1", "circo": "val,test"}


def convert_benchmark(name: str, root: str, out: str, splits: str | None = None, maxcount: int = 1000,
                      categories: str = "dress,shirt,toptee") -> int:
    """`cirlab data fashioniq|cirr|circo --root R --out O [...]`: convert and print the report."""
    from cirlab.errors import CirlabError

    folder = Path(root)
    if not folder.is_dir():
        raise CirlabError(f"--root {folder} is not a folder", f"point --root at {name}'s official layout")
    chosen = _split_list(splits or _DEFAULT_SPLITS[name])
    try:
        if name == "fashioniq":
            from cirlab.data.benchmarks.fashioniq import convert_fashioniq
            report = convert_fashioniq(folder, out, categories=_split_list(categories), splits=chosen,
                                       maxcount=maxcount)
        elif name == "cirr":
            from cirlab.data.benchmarks.cirr import convert_cirr
            report = convert_cirr(folder, out, splits=chosen, maxcount=maxcount)
        else:
            from cirlab.data.benchmarks.circo import convert_circo
            report = convert_circo(folder, out, splits=chosen, maxcount=maxcount)
    except CirlabError:
        raise
    except (FileNotFoundError, ValueError) as e:
        raise CirlabError(str(e), f"check --root against {name}'s official layout") from None
    print(report.summary())
    return 0
