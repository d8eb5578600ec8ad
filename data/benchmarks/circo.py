"""CIRCO: conversion of the official annotations plus the COCO 2017 unlabeled images to shards.

Official layout under ROOT (miccunifi/CIRCO)::

    annotations/{val,test}.json   [{"id", "reference_img_id", "target_img_id", "relative_caption",
                                    "shared_concept", "gt_img_ids"}, ...]  (test: no target, no gt)
    COCO2017_unlabeled/unlabeled2017/000000xxxxxx.jpg
    COCO2017_unlabeled/annotations/image_info_unlabeled2017.json   (optional: gallery order and ids)

Image ids are the COCO ids as strings ("281438"). The gallery (about 123k images) is written once,
under ``out/gallery``, and both evaluation sets' gallery indexes point at it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from cirlab.data.benchmarks import ConversionReport, exists, image_bytes, load_json, write_eval
from cirlab.data.evalset import Protocol
from cirlab.data.shards import write_shards

SPLITS = ("val", "test")


def _gallery_files(root: Path, report: ConversionReport) -> dict[str, Path]:
    """COCO id (string) -> image path, in the official image-info order (else sorted file names)."""
    coco = root / "COCO2017_unlabeled"
    folder = coco / "unlabeled2017"
    info = coco / "annotations" / "image_info_unlabeled2017.json"
    files: dict[str, Path] = {}
    if info.is_file():
        meta = load_json(info, "COCO unlabeled image info")
        for im in meta["images"]:
            p = folder / im["file_name"]
            if exists(p):
                files[str(im["id"])] = p
            else:
                report.missing.append(str(p))
        return files
    if not folder.is_dir():
        raise FileNotFoundError(f"COCO 2017 unlabeled images not found at {folder}: --root must hold "
                                "COCO2017_unlabeled/unlabeled2017/")
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.stem.isdigit() and exists(p):
            files[str(int(p.stem))] = p
    return files


def convert_circo(root: str | os.PathLike, out_dir: str | os.PathLike, splits: Sequence[str] = SPLITS,
                  maxcount: int = 1000) -> ConversionReport:
    """Write CIRCO as ``out/gallery`` (once) and ``out/eval/{val,test}``.

    Protocol "circo": the reference is not removed, mAP@{5,10,25,50}, no recall; the query text is
    the relative caption only (shared_concept kept in the json, not in texts); test has no targets.
    """
    root, out = Path(root), Path(out_dir)
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"unknown CIRCO splits {bad}; expected some of {', '.join(SPLITS)}")
    report = ConversionReport("circo", out)
    by_split = {}
    for split in splits:
        f = root / "annotations" / f"{split}.json"
        rows = load_json(f, f"CIRCO {split} annotations")
        need = ("id", "reference_img_id", "relative_caption") + \
            (("target_img_id", "gt_img_ids") if split != "test" else ())
        if not isinstance(rows, list):
            raise ValueError(f"{f}: expected a list of queries, got {type(rows).__name__}")
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or any(k not in r for k in need):
                raise ValueError(f"{f}: entry {i} lacks one of {need}: {str(r)[:120]}")
        by_split[split] = rows

    files = _gallery_files(root, report)
    gallery = write_shards(({"id": i, "image": image_bytes(p, "jpeg")} for i, p in files.items()),
                           out / "gallery", "image", maxcount=maxcount)
    report.written["gallery"] = gallery.total

    for split, rows in by_split.items():
        has_targets = split != "test"

        def queries() -> Iterator[dict[str, Any]]:
            for r in rows:
                ref = str(r["reference_img_id"])
                if ref not in files:
                    report.missing.append(f"COCO image {ref} (reference of query {r['id']})")
                    report.skip(f"{split} query: reference image missing")
                    continue
                q = {"id": str(r["id"]), "ref": image_bytes(files[ref], "jpeg"), "ref_id": ref,
                     "texts": [r["relative_caption"]], "shared_concept": r.get("shared_concept"),
                     "text_format": "relative_clause", "target_id": None, "gt_ids": []}
                if has_targets:
                    gt = [str(g) for g in r["gt_img_ids"]]
                    absent = [g for g in gt if g not in files]
                    if str(r["target_img_id"]) not in files:
                        report.skip(f"{split} query: target image missing")
                        report.missing.append(f"COCO image {r['target_img_id']} (target of query {r['id']})")
                        continue
                    if absent:
                        report.note(f"{split}: ground-truth image missing from the gallery", len(absent))
                    q["target_id"], q["gt_ids"] = str(r["target_img_id"]), gt
                yield q
        # Recall@K of the one target image is reported next to mAP@K, as the reference evaluation does;
        # selection is by mAP
        protocol = Protocol(name="circo", split=split, exclude_reference=False, recall_ks=[5, 10, 25, 50],
                            # captions written to follow "that" (Pic2Word's CIRCO prompt differs from its CIRR one)
                            map_ks=[5, 10, 25, 50], text_format="relative_clause", has_targets=has_targets,
                            score_keys=["mAP@5", "mAP@10", "mAP@25", "mAP@50"], submission="circo")
        es = write_eval(out / "eval" / split, protocol, queries(), gallery, maxcount)
        report.written[f"eval/{split}/queries"] = es.queries.total
    report.save()
    return report
