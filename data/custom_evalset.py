"""`cirlab data convert --kind evalset`: an evaluation set from your own queries file and gallery folder.

Gallery: every image file under ``--gallery`` (recursively); its id is its path relative to the folder
without the extension (``shoes/b.jpg`` -> ``shoes/b``), the same default ids `convert --kind triplet`
gives. Unreadable images (0 bytes, corrupt) are skipped and listed.

Queries (JSONL, or CSV with the same columns; CSV lists are separated by "|"), one per row:

* ``reference``: a gallery image (its path relative to the gallery, with or without the extension),
  or the path of an image outside the gallery (absolute, or relative to the queries file);
* ``text`` (or ``caption``), or ``texts``: [one text] — the modification text (several texts are a bad
  row: the plain protocol reads one text per query, so they would be dropped);
* ``target`` and/or ``targets``: [...] — the gallery image(s) that answer the query (paths or ids);
  R@K counts ``target`` (else the first of ``targets``), mAP@K all of them;
* optional ``id`` (default ``q<line>``); any other field rides along in the query's json.

Written with :func:`cirlab.data.evalset.write_eval_set` under Protocol ``name="custom"``,
``text_format="plain"``. Nothing is written when the inputs are wrong (CirlabError first).
"""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from cirlab.data.convert import (BAD_FIELD, MISSING_FIELD, BadRowError, ConvertError, MissingInputError, _Bad,
                                 _Converter, _optional, _pick, _read_rows, describe_value)
from cirlab.data.evalset import Protocol, write_eval_set
from cirlab.data.images import ImageDecodeError, image_for_shard, list_image_files, open_image
from cirlab.errors import CirlabError

log = logging.getLogger(__name__)

# --metrics name -> (Protocol field, the ks CIRR/CIRCO report)
METRICS: dict[str, tuple[str, list[int]]] = {"recall": ("recall_ks", [1, 5, 10, 50]),
                                             "map": ("map_ks", [5, 10, 25, 50])}
NOT_IN_GALLERY = "not in gallery"


def parse_metrics(text: str) -> list[str]:
    """'recall,map' -> ['recall', 'map']; an unknown name is one error listing the known ones."""
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise CirlabError(f"unknown --metrics {', '.join(map(repr, unknown)) or repr(text)}",
                          f"choose from {', '.join(METRICS)} (comma-separated, e.g. recall,map)")
    return list(dict.fromkeys(names))


@dataclass
class EvalSetReport:
    """What `convert --kind evalset` wrote and skipped."""

    out: Path
    protocol: Protocol
    queries: int = 0
    gallery: int = 0
    skipped_images: list[str] = field(default_factory=list)   # "path: reason"
    problems: list[str] = field(default_factory=list)         # "file:line: reason"
    notes: list[str] = field(default_factory=list)

    def print(self, limit: int = 20) -> None:
        """The summary on stdout; skipped images and rows listed (the first ``limit`` of each)."""
        ks = ", ".join(f"{k}={getattr(self.protocol, k)}" for k in ("recall_ks", "map_ks") if getattr(self.protocol, k))
        print(f"wrote evaluation set {self.out}: {self.queries} queries, {self.gallery} gallery images "
              f"(protocol custom: exclude_reference={self.protocol.exclude_reference}, {ks})")
        for what, items in (("unreadable gallery images", self.skipped_images), ("rows", self.problems)):
            if items:
                print(f"skipped {len(items)} {what}:")
                for line in items[:limit]:
                    print(f"  {line}")
                if len(items) > limit:
                    print(f"  … and {len(items) - limit} more")
        for note in self.notes:
            print(f"note: {note}")


def gallery_id_of(path: Path, folder: Path) -> str:
    """A gallery image's id: its path relative to the gallery folder, without the extension."""
    return path.relative_to(folder).with_suffix("").as_posix()


def scan_gallery(folder: Path) -> tuple[dict[str, Path], list[tuple[Path, str]]]:
    """Readable gallery images by id and the unreadable ones with the reason, in path order."""
    files = list_image_files(folder)
    ids: dict[str, Path] = {}
    skipped: list[tuple[Path, str]] = []
    for path in tqdm(files, desc=f"checking {folder}", unit="image", disable=None, file=sys.stderr):
        try:
            open_image(path)
        except (OSError, ImageDecodeError) as exn:
            skipped.append((path, str(exn)))
            continue
        gid = gallery_id_of(path, folder)
        if gid in ids:
            raise CirlabError(f"gallery images {ids[gid]} and {path} would share the id {gid!r}",
                              "ids are paths without the extension: rename one of them")
        ids[gid] = path
    return ids, skipped


class _QueryReader:
    """Query rows -> validated query records (paths and ids only; images are read while writing)."""

    def __init__(self, gallery: dict[str, Path], gallery_dir: Path, queries_dir: Path, skipped: list[Path],
                 exclude_reference: bool) -> None:
        self.gallery, self.gallery_dir, self.queries_dir = gallery, gallery_dir, queries_dir
        self.exclude_reference = exclude_reference
        self.skipped = {gallery_id_of(p, gallery_dir) for p in skipped} | {p.relative_to(gallery_dir).as_posix()
                                                                            for p in skipped}
        self.by_path = {p.resolve(): gid for gid, p in gallery.items()}

    def gallery_id(self, value: str) -> str | None:
        """The gallery id a reference/target value names: an id, a relative path, or an absolute path."""
        v = value.strip().replace("\\", "/")
        if v in self.gallery:
            return v
        for candidate in (Path(v) if os.path.isabs(v) else self.gallery_dir / v,):
            gid = self.by_path.get(candidate.resolve())
            if gid is not None:
                return gid
        return None

    def not_found(self, key: str, value: str) -> _Bad:
        v = value.strip()
        if v.replace("\\", "/") in self.skipped:
            return _Bad(NOT_IN_GALLERY, f"{key} {v!r} is an unreadable gallery image (skipped)")
        return _Bad(NOT_IN_GALLERY, f"{key} {v!r} is not in the gallery {self.gallery_dir}")

    def query(self, row: dict[str, Any], no: int) -> dict[str, Any]:
        texts = _Converter.texts(row)
        if len(texts) > 1:  # the plain protocol reads a query's first text only: never drop the others silently
            raise _Bad(BAD_FIELD, f"the query has {len(texts)} texts, but a plain query is read as one: "
                                  "join them into one text")
        _, ref = _pick(row, ("reference",))
        if not isinstance(ref, str):
            raise _Bad(BAD_FIELD, f"field 'reference' {describe_value(ref)}: give an image path")
        ref_id = self.gallery_id(ref)
        ref_path = self.gallery[ref_id] if ref_id is not None else None
        if ref_path is None:  # an image outside the gallery
            outside = Path(ref) if os.path.isabs(ref) else self.queries_dir / ref
            if not outside.is_file():
                raise self.not_found("reference", ref)
            try:
                open_image(outside)
            except (OSError, ImageDecodeError) as exn:
                raise _Bad("bad image", f"unreadable reference image {outside} ({exn})") from exn
            ref_path, ref_id = outside, Path(ref).with_suffix("").as_posix()
        targets = self.targets(row)
        if self.exclude_reference and ref_id in targets:
            raise _Bad(BAD_FIELD, f"target {ref_id!r} is the reference, which --exclude-reference removes "
                                  "from its own ranking")
        sample = {"id": _optional(row, "id") or f"q{no}", "ref": ref_path, "ref_id": ref_id, "texts": texts,
                  "target_id": targets[0], "gt_ids": targets, "text_format": "plain"}
        used = {"id", "reference", "text", "texts", "caption", "target", "targets"}
        for k, v in row.items():
            if k not in used and k not in sample:
                sample[k] = v
        return sample

    def targets(self, row: dict[str, Any]) -> list[str]:
        values: list[Any] = []
        if "target" in row and _optional(row, "target") is not None:
            values.append(row["target"])
        more = row.get("targets")
        if isinstance(more, str) and more.strip():
            more = [more]
        if isinstance(more, list):
            values += more
        elif more not in (None, ""):
            raise _Bad(BAD_FIELD, f"field 'targets' {describe_value(more)}: give a list of gallery images")
        if not values:
            if "target" in row or "targets" in row:
                key = "target" if "target" in row else "targets"
                raise _Bad(BAD_FIELD, f"field {key!r} {describe_value(row[key]) or 'names no image'}")
            raise _Bad(MISSING_FIELD, "missing field 'target' (or 'targets')")
        ids: list[str] = []
        for v in values:
            if not isinstance(v, str) or describe_value(v) is not None:
                raise _Bad(BAD_FIELD, f"a target {describe_value(v)}: give gallery image paths or ids")
            gid = self.gallery_id(v)
            if gid is None:
                raise self.not_found("target", v)
            if gid not in ids:
                ids.append(gid)
        return ids


def convert_eval_set(queries_file: str | os.PathLike, gallery_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     exclude_reference: bool = False, metrics: list[str] | tuple[str, ...] = ("recall",),
                     strict: bool = False, maxcount: int = 1000) -> EvalSetReport:
    """Validate every query and gallery image, then write the evaluation set (nothing if inputs are wrong)."""
    qpath, gdir = Path(queries_file), Path(gallery_dir)
    if not qpath.is_file():
        raise MissingInputError(f"queries file {qpath} does not exist", "pass the JSONL/CSV file with --queries")
    if not gdir.is_dir():
        raise MissingInputError(f"gallery folder {gdir} does not exist", "pass the folder of images with --gallery")
    for name in metrics:
        if name not in METRICS:
            raise CirlabError(f"unknown metric {name!r}", f"choose from {', '.join(METRICS)}")
    gallery, skipped_images = scan_gallery(gdir)
    if not gallery:
        why = (f"; {len(skipped_images)} unreadable, the first: {skipped_images[0][0]} ({skipped_images[0][1]})"
               if skipped_images else "")
        raise CirlabError(f"no readable images under {gdir}{why}",
                          f"the gallery is every image file ({', '.join(e[1:] for e in ('.jpg', '.png', '.webp'))}, …) "
                          "under --gallery")
    reader = _QueryReader(gallery, gdir, qpath.parent, [p for p, _ in skipped_images], exclude_reference)
    queries: list[dict[str, Any]] = []
    problems: list[str] = []
    reasons: Counter[str] = Counter()
    for no, row in _read_rows(qpath, "evalset"):
        try:
            if isinstance(row, _Bad):
                raise row
            queries.append(reader.query(row, no))
        except _Bad as b:
            line = f"{qpath}:{no}: {b}"
            if strict:
                raise BadRowError(line, "fix the row, or drop --strict to skip bad rows with a report") from None
            log.debug("skipped row %s", line)  # listed in the report
            problems.append(line)
            reasons[b.reason] += 1
    if not queries:
        first = f"; the first: {problems[0]}" if problems else ""
        raise ConvertError(f"no query written: {qpath} has {len(problems)} rows, none usable"
                           f" ({', '.join(f'{k}: {v}' for k, v in reasons.most_common()) or 'the file is empty'}){first}",
                           "docs/data.md describes the query fields: reference, text or texts, target or targets")
    seen: set[str] = set()
    duplicates = sorted({q["id"] for q in queries if q["id"] in seen or seen.add(q["id"])})
    if duplicates:
        raise ConvertError(f"{qpath}: query ids repeat: {', '.join(duplicates[:5])}", "give each query its own id")

    protocol, notes = _protocol(metrics, len(gallery) - int(exclude_reference), exclude_reference)
    report = EvalSetReport(Path(out_dir), protocol, len(queries), len(gallery),
                           [f"{p}: {why}" for p, why in skipped_images], problems, notes)

    def gallery_samples() -> Iterator[dict[str, Any]]:
        for gid, path in gallery.items():
            yield {"id": gid, "image": image_for_shard(path.read_bytes())}

    def query_samples() -> Iterator[dict[str, Any]]:
        for q in queries:
            yield {**q, "ref": image_for_shard(Path(q["ref"]).read_bytes())}

    write_eval_set(out_dir, protocol, query_samples(), gallery_samples(), maxcount=maxcount)
    return report


def _protocol(metrics: list[str] | tuple[str, ...], rankable: int, exclude_reference: bool) -> tuple[Protocol, list[str]]:
    """The custom protocol; recall ks at or above the number of rankable images (always 100%) are left
    out, with a note."""
    kwargs: dict[str, Any] = {"recall_ks": [], "map_ks": []}
    notes: list[str] = []
    for name in metrics:
        key, ks = METRICS[name]
        kept = ([k for k in ks if k < rankable] or [min(ks)]) if name == "recall" else list(ks)
        if len(kept) < len(ks):
            notes.append(f"R@{', R@'.join(str(k) for k in ks if k not in kept)} left out: the gallery ranks only "
                         f"{rankable} images per query, so they would always be 100")
        kwargs[key] = kept
    return Protocol(name="custom", split="val", exclude_reference=exclude_reference, text_format="plain",
                    **kwargs), notes
