"""Convert a JSONL/CSV file of rows plus a folder of images into shards of one sample kind.

Row formats (column names are the same in CSV; "id" is optional everywhere):

* pair:        {"image", "text"} ("caption" is an alias of "text")
* image:       {"image"}
* text:        {"text"} (+ optional "masked")
* triplet:     {"reference", "target", "text" or "texts": [...]} (+ "reference_id", "target_id");
               in CSV, "texts" holds several texts separated by "|"
* instruction: {"image", "instruction", "answer"}

Image paths are relative to the image root (or absolute). Default ids: the image path relative
to the root without its extension (a repeated one gets "#n"), the row number for text and
triplet rows. Other columns go to the sample's json member. Every bad row is reported as
``file:line: reason`` and counted; ``strict=True`` raises on the first one instead.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from cirlab.data.kinds import check_kind
from cirlab.data.shards import ShardIndex, write_shards

log = logging.getLogger(__name__)

CONVERT_KINDS = ("pair", "image", "text", "triplet", "instruction")
# reasons a row is skipped (keys of ConvertReport.skipped_by_reason)
MALFORMED, MISSING_FIELD, MISSING_IMAGE, BAD_IMAGE = "malformed row", "missing field", "missing image", "bad image"


class BadRowError(ValueError):
    """A row that cannot be converted (raised in strict mode); the message is ``file:line: reason``."""


@dataclass
class ConvertReport:
    """What a conversion wrote and what it skipped, with one ``file:line: reason`` per skipped row."""

    written: int = 0
    skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    index: ShardIndex | None = None

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped_by_reason.items())) or "none"
        shards = len(self.index.shards) if self.index is not None else 0
        return f"wrote {self.written} samples in {shards} shard(s); skipped {self.skipped} rows ({reasons})"


class _Bad(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | _Bad]]:
    """(line number, row dict or _Bad) for each row of a .jsonl/.json-lines or .csv file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        with path.open(encoding="utf-8") as f:
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exn:
                    yield no, _Bad(MALFORMED, f"malformed JSON ({exn.args[0] if exn.args else exn})")
                    continue
                if not isinstance(row, dict):
                    yield no, _Bad(MALFORMED, f"row is a JSON {type(row).__name__}, not an object")
                    continue
                yield no, row
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            while True:
                no = reader.line_num + 1
                try:
                    values = next(reader)
                except StopIteration:
                    return
                except csv.Error as exn:
                    yield no, _Bad(MALFORMED, f"malformed CSV ({exn})")
                    continue
                if not any(v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    yield no, _Bad(MALFORMED, f"{len(values)} columns, the header has {len(header)}")
                    continue
                # empty cells count as absent; "texts" holds several texts separated by "|"
                row: dict[str, Any] = {k: v for k, v in zip(header, values) if v.strip() != ""}
                if "texts" in row:
                    row["texts"] = [t.strip() for t in row["texts"].split("|") if t.strip()]
                yield no, row
    else:
        raise ValueError(f"rows file {path} must end in .jsonl or .csv (got {path.suffix!r})")


class _Converter:
    """Turns rows of one kind into sample dicts, verifying images on the way."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind, self.root = kind, root
        self.used_ids: Counter[str] = Counter()

    def image(self, row: dict[str, Any], key: str) -> tuple[Any, str]:
        """Verified image for row[key] (original bytes if JPEG/PNG, else a PIL image) and its default id."""
        value = row.get(key)
        if not isinstance(value, str) or not value:
            raise _Bad(MISSING_FIELD, f"missing field {key!r}")
        path = Path(value) if os.path.isabs(value) else self.root / value
        if not path.is_file():
            raise _Bad(MISSING_IMAGE, f"image file not found: {path}")
        try:
            data = path.read_bytes()
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            img.load()
        except Exception as exn:  # unreadable file or undecodable/truncated image
            raise _Bad(BAD_IMAGE, f"unreadable image {path} ({type(exn).__name__}: {exn})") from exn
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            rel = path
        default_id = rel.with_suffix("").as_posix()
        return (data if fmt in ("JPEG", "PNG") else img), default_id

    @staticmethod
    def text(row: dict[str, Any], *keys: str) -> str:
        for k in keys:
            v = row.get(k)
            if isinstance(v, str) and v.strip():
                return v
        raise _Bad(MISSING_FIELD, f"missing field {keys[0]!r}")

    def unique(self, default_id: str) -> str:
        n = self.used_ids[default_id]
        self.used_ids[default_id] += 1
        return default_id if n == 0 else f"{default_id}#{n}"

    def sample(self, row: dict[str, Any], no: int) -> dict[str, Any]:
        kind = self.kind
        used: set[str] = {"id"}
        s: dict[str, Any] = {}
        if kind in ("pair", "image", "instruction"):
            s["image"], default = self.image(row, "image")
            used.add("image")
            if kind == "pair":
                s["text"] = self.text(row, "text", "caption")
                used |= {"text", "caption"}
            if kind == "instruction":
                s["instruction"] = self.text(row, "instruction")
                s["answer"] = self.text(row, "answer")
                used |= {"instruction", "answer"}
            s["id"] = str(row["id"]) if "id" in row else self.unique(default)
        elif kind == "text":
            s["text"] = self.text(row, "text", "caption")
            used |= {"text", "caption"}
            s["id"] = str(row.get("id", no))
        elif kind == "triplet":
            texts = row.get("texts")
            if texts is None and isinstance(row.get("text"), list):  # "text": [...] works too
                texts = row["text"]
            if isinstance(texts, str):
                texts = [texts]
            if not texts:
                texts = [self.text(row, "text", "caption")]
            if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
                raise _Bad(MISSING_FIELD, "field 'texts' must be a list of non-empty strings")
            s["ref"], ref_default = self.image(row, "reference")
            s["tgt"], tgt_default = self.image(row, "target")
            s["ref_id"] = str(row.get("reference_id", ref_default))
            s["tgt_id"] = str(row.get("target_id", tgt_default))
            s["texts"] = texts
            s["id"] = str(row.get("id", no))
            used |= {"texts", "text", "caption", "reference", "target", "reference_id", "target_id"}
        for k, v in row.items():  # everything else rides along in the json member
            if k not in used and k not in s:
                s[k] = v
        return s


def convert(kind: str, rows_file: str | os.PathLike, image_root: str | os.PathLike | None,
            out_dir: str | os.PathLike, maxcount: int = 1000, strict: bool = False,
            image_format: str = "jpeg") -> ConvertReport:
    """Write shards of ``kind`` from a JSONL/CSV rows file; bad rows are reported, counted and skipped."""
    check_kind(kind)
    if kind not in CONVERT_KINDS:
        raise ValueError(f"convert writes kinds {', '.join(CONVERT_KINDS)}, not {kind!r}: query shards "
                         "come from the benchmark readers (cirlab.data.benchmarks)")
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    rows_path = Path(rows_file)
    if not rows_path.is_file():
        raise FileNotFoundError(f"rows file {rows_path} does not exist")
    root = Path(image_root) if image_root is not None else rows_path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist: pass the folder the image paths are relative to")
    report = ConvertReport()
    reasons: Counter[str] = Counter()
    conv = _Converter(kind, root)

    def bad(no: int, b: _Bad) -> None:
        text = f"{rows_path}:{no}: {b}"
        if strict:
            raise BadRowError(text)
        log.warning("skipped row %s", text)
        report.problems.append(text)
        reasons[b.reason] += 1
        report.skipped += 1

    def samples() -> Iterator[dict[str, Any]]:
        for no, row in _read_rows(rows_path):
            if isinstance(row, _Bad):
                bad(no, row)
                continue
            try:
                sample = conv.sample(row, no)
            except _Bad as b:
                bad(no, b)
                continue
            report.written += 1
            yield sample

    report.index = write_shards(samples(), out_dir, kind, maxcount=maxcount, image_format=image_format)
    report.skipped_by_reason = dict(reasons)
    return report


def cli(argv: list[str] | None = None) -> int:
    """``cirlab data convert``: rows file + image folder -> shards; prints the summary."""
    p = argparse.ArgumentParser(prog="cirlab data convert", description=convert.__doc__)
    p.add_argument("--kind", required=True, choices=CONVERT_KINDS)
    p.add_argument("--rows", required=True, help="JSONL or CSV file, one sample per row")
    p.add_argument("--images", default=None, help="folder the image paths are relative to (default: the rows file's)")
    p.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar and index.json")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row")
    p.add_argument("--image-format", default="jpeg", choices=("jpeg", "png"),
                   help="format for images that must be re-encoded (JPEG/PNG files are kept as they are)")
    args = p.parse_args(argv)
    try:
        report = convert(args.kind, args.rows, args.images, args.out, maxcount=args.maxcount,
                         strict=args.strict, image_format=args.image_format)
    except (BadRowError, FileNotFoundError, ValueError) as exn:
        print(f"error: {exn}")
        return 2
    _print_report(report, args.out)
    return 0


def _print_report(report: ConvertReport, out: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a dependency, but the summary must not depend on it
        print(report.summary())
        for line in report.problems[:20]:
            print("  " + line)
        return
    console = Console()
    table = Table(title=f"cirlab data convert -> {out}")
    table.add_column("")
    table.add_column("rows", justify="right")
    table.add_row("written", str(report.written))
    for reason, n in sorted(report.skipped_by_reason.items()):
        table.add_row(f"skipped: {reason}", str(n))
    console.print(table)
    for line in report.problems[:20]:
        console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    if len(report.problems) > 20:
        console.print(f"  … and {len(report.problems) - 20} more")
