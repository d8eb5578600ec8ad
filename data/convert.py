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

import csv
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Any, Iterator

from cirlab.data.images import ImageDecodeError, image_for_shard
from cirlab.data.kinds import check_kind
from cirlab.data.shards import ShardIndex, write_shards
from cirlab.errors import CirlabError

log = logging.getLogger(__name__)

CONVERT_KINDS = ("pair", "image", "text", "triplet", "instruction")
# reasons a row is skipped (keys of ConvertReport.skipped_by_reason)
MALFORMED, MISSING_FIELD, BAD_FIELD = "malformed row", "missing field", "bad field"
MISSING_IMAGE, BAD_IMAGE = "missing image", "bad image"
# the columns each kind reads: one tuple of alternative names per field it needs
NEEDED_COLUMNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "pair": (("image",), ("text", "caption")),
    "image": (("image",),),
    "text": (("text", "caption"),),
    "triplet": (("reference",), ("target",), ("text", "texts", "caption")),
    "instruction": (("image",), ("instruction",), ("answer",)),
    "evalset": (("reference",), ("text", "texts", "caption"), ("target", "targets")),  # its queries file
}
# every column some kind reads; an empty CSV cell in one of them is reported, in any other it is dropped
KNOWN_COLUMNS = {"id", "masked", "reference_id", "target_id"} | {
    name for fields in NEEDED_COLUMNS.values() for alternatives in fields for name in alternatives}


class ConvertError(CirlabError, ValueError):
    """A conversion that cannot run or wrote nothing (a ValueError too, for callers that catch those)."""


class BadRowError(ConvertError):
    """A row that cannot be converted (raised in strict mode); the message is ``file:line: reason``."""


class MissingInputError(CirlabError, FileNotFoundError):
    """A rows file or image folder that does not exist."""


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


def describe_column_names(alternatives: tuple[str, ...]) -> str:
    """'text' or ('text' or 'caption') for messages."""
    return " or ".join(repr(a) for a in alternatives)


def check_header(path: Path, header: list[str], kind: str) -> None:
    """One error naming the expected and the found columns when a CSV header lacks a field of ``kind``."""
    missing = [alts for alts in NEEDED_COLUMNS.get(kind, ()) if not any(a in header for a in alts)]
    if not missing:
        return
    needed = ", ".join(describe_column_names(a) for a in NEEDED_COLUMNS[kind])
    hint = f"rename the header's columns to {needed} (docs/data.md lists each kind's columns)"
    if len(header) == 1 and any(sep in header[0] for sep in ";\t"):
        hint = "the file is not comma-separated: save it as CSV with commas (or as .tsv with tabs)"
    lowered = {h.lower(): h for h in header}
    near = [f"{lowered[a.lower()]!r} -> {a!r}" for alts in missing for a in alts if a.lower() in lowered]
    if near:
        hint = f"column names are case-sensitive: {', '.join(near)}"
    raise ConvertError(f"{path}: the CSV header names columns {header}, but {kind} rows need {needed}; "
                       f"missing {', '.join(describe_column_names(a) for a in missing)}", hint)


def _read_rows(path: Path, kind: str | None = None) -> Iterator[tuple[int, dict[str, Any] | _Bad]]:
    """(line number, row dict or _Bad) for each row of a .jsonl/.json-lines or .csv file.

    A UTF-8 byte-order mark (Excel writes one) is skipped; a CSV header that lacks a column ``kind``
    needs is one error before any row is read.
    """
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson", ".json"):
            yield from _read_jsonl(path)
        elif suffix in (".csv", ".tsv"):
            yield from _read_csv(path, kind, "\t" if suffix == ".tsv" else ",")
        else:
            raise ConvertError(f"rows file {path} must end in .jsonl or .csv (got {path.suffix!r})")
    except UnicodeDecodeError as exn:
        raise ConvertError(f"{path} is not UTF-8 text (byte {exn.object[exn.start]:#04x} at offset {exn.start})",
                           "save it as UTF-8 (Excel: 'CSV UTF-8')") from exn


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | _Bad]]:
    with path.open(encoding="utf-8-sig") as f:
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


def _read_csv(path: Path, kind: str | None, delimiter: str) -> Iterator[tuple[int, dict[str, Any] | _Bad]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        if kind is not None:
            check_header(path, header, kind)
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
            # an empty cell of a column we read stays "" (reported as empty); others are dropped
            row: dict[str, Any] = {k: v for k, v in zip(header, values) if v.strip() != "" or k in KNOWN_COLUMNS}
            for key in ("texts", "targets"):  # lists: items separated by "|"
                if key in row:
                    row[key] = [t.strip() for t in row[key].split("|") if t.strip()] or ""
            yield no, row


def describe_value(value: Any) -> str | None:
    """What is wrong with a field meant to hold a non-empty string, or None if nothing is."""
    if isinstance(value, str):
        if value == "":
            return "is empty"
        return None if value.strip() else "holds only whitespace"
    if value is None:
        return "is null"
    if isinstance(value, bool):
        return f"is {str(value).lower()}, not a string"
    if isinstance(value, (int, float)):
        return f"is a number ({value!r}), not a string (quote it in the JSON if it is meant as text)"
    if isinstance(value, list):
        return "is an empty list" if not value else "is a list, not a string"
    return f"is a JSON {'object' if isinstance(value, dict) else type(value).__name__}, not a string"


def _usable(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value)
    return describe_value(value) is None


def _pick(row: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, Any]:
    """The first of ``keys`` with a usable value; else why not (absent, empty, wrong type) as _Bad."""
    present = [k for k in keys if k in row]
    for k in present:
        if _usable(row[k]):
            return k, row[k]
    if not present:
        also = f" (or {', '.join(repr(k) for k in keys[1:])})" if len(keys) > 1 else ""
        raise _Bad(MISSING_FIELD, f"missing field {keys[0]!r}{also}")
    k = present[0]
    raise _Bad(BAD_FIELD, f"field {k!r} {describe_value(row[k])}")


def _optional(row: dict[str, Any], key: str) -> str | None:
    """An optional field (id, reference_id, …) as a string; absent, null and empty count as not given."""
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return str(value)


class _Converter:
    """Turns rows of one kind into sample dicts, verifying images on the way."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind, self.root = kind, root
        self.used_ids: Counter[str] = Counter()

    def image(self, row: dict[str, Any], key: str) -> tuple[Any, str]:
        """Verified image for row[key] (original bytes if 8-bit JPEG/PNG, else a PIL image) and its default id."""
        _, value = _pick(row, (key,))
        if not isinstance(value, str):
            raise _Bad(BAD_FIELD, f"field {key!r} {describe_value(value)}: give the image's path")
        path = Path(value) if os.path.isabs(value) else self.root / value
        if not path.is_file():
            raise _Bad(MISSING_IMAGE, f"image file not found: {path}")
        try:
            image = image_for_shard(path.read_bytes())
        except (OSError, ImageDecodeError) as exn:  # unreadable file or undecodable/truncated image
            raise _Bad(BAD_IMAGE, f"unreadable image {path} ({exn})") from exn
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            rel = path
        return image, rel.with_suffix("").as_posix()

    @staticmethod
    def text(row: dict[str, Any], *keys: str) -> str:
        key, value = _pick(row, keys)
        if not isinstance(value, str):
            raise _Bad(BAD_FIELD, f"field {key!r} {describe_value(value)}")
        return value

    @staticmethod
    def texts(row: dict[str, Any]) -> list[str]:
        """A triplet's texts: "texts" (a list, or one string), else "text"/"caption" (a string or a list)."""
        key, value = _pick(row, ("texts", "text", "caption"))
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list):
            raise _Bad(BAD_FIELD, f"field {key!r} {describe_value(value)}: give a string or a list of strings")
        for i, t in enumerate(texts, 1):
            problem = describe_value(t)
            if problem is not None:
                raise _Bad(BAD_FIELD, f"field {key!r}: text {i} of {len(texts)} {problem}")
        return texts

    def unique(self, default_id: str) -> str:
        n = self.used_ids[default_id]
        self.used_ids[default_id] += 1
        return default_id if n == 0 else f"{default_id}#{n}"

    def sample(self, row: dict[str, Any], no: int) -> dict[str, Any]:
        kind = self.kind
        used: set[str] = {"id"}
        s: dict[str, Any] = {}
        given_id = _optional(row, "id")
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
            s["id"] = given_id if given_id is not None else self.unique(default)
        elif kind == "text":
            s["text"] = self.text(row, "text", "caption")
            used |= {"text", "caption"}
            s["id"] = given_id if given_id is not None else str(no)
        elif kind == "triplet":
            texts = self.texts(row)
            s["ref"], ref_default = self.image(row, "reference")
            s["tgt"], tgt_default = self.image(row, "target")
            s["ref_id"] = _optional(row, "reference_id") or ref_default
            s["tgt_id"] = _optional(row, "target_id") or tgt_default
            s["texts"] = texts
            s["id"] = given_id if given_id is not None else str(no)
            used |= {"texts", "text", "caption", "reference", "target", "reference_id", "target_id"}
        for k, v in row.items():  # everything else rides along in the json member (an empty known column does not)
            if k not in used and k not in s and not (k in KNOWN_COLUMNS and _optional(row, k) is None):
                s[k] = v
        return s


def _check_inputs(rows_file: str | os.PathLike, image_root: str | os.PathLike | None) -> tuple[Path, Path]:
    rows_path = Path(rows_file)
    if not rows_path.is_file():
        raise MissingInputError(f"rows file {rows_path} does not exist", "pass the JSONL/CSV file with --rows")
    root = Path(image_root) if image_root is not None else rows_path.parent
    if not root.is_dir():
        raise MissingInputError(f"image folder {root} does not exist",
                                "pass the folder the image paths are relative to with --images")
    return rows_path, root


def convert(kind: str, rows_file: str | os.PathLike, image_root: str | os.PathLike | None,
            out_dir: str | os.PathLike, maxcount: int = 1000, strict: bool = False,
            image_format: str = "jpeg") -> ConvertReport:
    """Write shards of ``kind`` from a JSONL/CSV rows file; bad rows are reported, counted and skipped.

    All or nothing: a strict-mode failure, or a file none of whose rows converts, raises a CirlabError
    and leaves no shards and no index behind (an earlier shard set in ``out_dir`` stays intact).
    """
    check_kind(kind)
    if kind not in CONVERT_KINDS:
        raise ConvertError(f"convert writes kinds {', '.join(CONVERT_KINDS)}, not {kind!r}",
                           "query shards come in evaluation sets: cirlab data convert --kind evalset, "
                           "or the benchmark readers (cirlab data cirr|fashioniq|circo)")
    if image_format not in ("jpeg", "png"):
        raise ConvertError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    rows_path, root = _check_inputs(rows_file, image_root)
    report = ConvertReport()
    reasons: Counter[str] = Counter()
    conv = _Converter(kind, root)

    def bad(no: int, b: _Bad) -> None:
        text = f"{rows_path}:{no}: {b}"
        if strict:
            raise BadRowError(text, "fix the row, or drop --strict to skip bad rows with a report")
        log.debug("skipped row %s", text)  # listed in the report; one warning at the end counts them
        report.problems.append(text)
        reasons[b.reason] += 1
        report.skipped += 1

    def samples() -> Iterator[dict[str, Any]]:
        for no, row in _read_rows(rows_path, kind):
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
        if report.written == 0:  # raised inside the writer, so that it leaves nothing behind
            raise nothing_written(rows_path, kind, report, reasons)

    report.index = write_shards(samples(), out_dir, kind, maxcount=maxcount, image_format=image_format)
    report.skipped_by_reason = dict(reasons)
    if report.skipped:
        log.warning("%s; the first: %s", report.summary(), report.problems[0])
    return report


def nothing_written(rows_path: Path, kind: str, report: ConvertReport, reasons: Counter[str]) -> ConvertError:
    """The error for a conversion in which no row converted: how many were skipped, and the first reason."""
    if not report.skipped:
        return ConvertError(f"{rows_path} holds no rows: nothing to convert", "give a file with one sample per row")
    by_reason = ", ".join(f"{k}: {v}" for k, v in reasons.most_common())
    return ConvertError(f"no {kind} sample written: all {report.skipped} rows of {rows_path} were skipped "
                        f"({by_reason}); the first: {report.problems[0]}",
                        "docs/data.md lists the fields of each kind")


def convert_command(kind: Literal["pair", "image", "text", "triplet", "instruction", "evalset"], out: str,
                    rows: Optional[str] = None, images: Optional[str] = None, maxcount: int = 1000,
                    strict: bool = False, image_format: Literal["jpeg", "png"] = "jpeg",
                    queries: Optional[str] = None, gallery: Optional[str] = None,
                    exclude_reference: bool = False, metrics: str = "recall") -> int:
    """JSONL/CSV rows + an image folder -> shards of a kind; or (kind evalset) queries + gallery -> an evaluation set.

    Args:
        kind: sample kind to write; evalset: an evaluation set from --queries and --gallery
        out: output folder for shard-NNNNNN.tar and index.json
        rows: JSONL or CSV file, one sample per row
        images: folder the image paths are relative to (default: the rows file's)
        maxcount: samples per shard
        strict: stop at the first bad row (and write nothing)
        image_format: format for images that must be re-encoded (8-bit JPEG/PNG files are kept as they are)
        queries: (evalset) JSONL or CSV file, one query per row: reference, text or texts, target or targets
        gallery: (evalset) folder of gallery images; ids are their paths relative to it, without the extension
        exclude_reference: (evalset) remove each query's reference image from its own ranking (as CIRR does)
        metrics: (evalset) comma-separated: recall (R@1,5,10,50), map (mAP@5,10,25,50)
    """
    if kind not in CONVERT_KINDS + ("evalset",):
        raise CirlabError(f"unknown kind {kind!r}", f"one of {', '.join(CONVERT_KINDS + ('evalset',))}")
    if maxcount < 1:
        raise CirlabError(f"--maxcount must be at least 1, got {maxcount}", "give the samples per shard")
    if kind == "evalset":
        from cirlab.data.custom_evalset import convert_eval_set, parse_metrics

        if queries is None or gallery is None:
            raise CirlabError("--kind evalset needs --queries FILE and --gallery DIR", "name both")
        if rows is not None:
            raise CirlabError("--kind evalset reads --queries and --gallery, not --rows", "drop --rows")
        report = convert_eval_set(queries, gallery, out, exclude_reference=exclude_reference,
                                  metrics=parse_metrics(metrics), strict=strict, maxcount=maxcount)
        report.print()
        return 0
    if rows is None:
        raise CirlabError(f"--kind {kind} needs --rows FILE", "the JSONL or CSV file of samples")
    for name, value in (("queries", queries), ("gallery", gallery)):
        if value is not None:
            raise CirlabError(f"--{name} is for --kind evalset", f"--kind {kind} reads --rows and --images")
    report = convert(kind, rows, images, out, maxcount=maxcount, strict=strict, image_format=image_format)
    _print_report(report, out)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``cirlab data convert``: rows file + image folder -> shards; prints the summary.

    User mistakes raise CirlabError (the `cirlab` command prints them as one line and exits 2).
    """
    from cirlab.typed_commands import run_function_command

    return run_function_command(convert_command, list(argv or []), "cirlab data convert")


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
