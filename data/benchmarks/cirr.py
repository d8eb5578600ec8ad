"""CIRR: conversion of the official files (release rc2) to triplet and evaluation shards.

Official layout under ROOT (CLIP4Cir's ``cirr_dataset``)::

    cirr/captions/cap.rc2.{split}.json      [{"pairid", "reference", "target_hard", "caption",
                                              "img_set": {"members": [...]}}, ...]  (test1: no target)
    cirr/image_splits/split.rc2.{split}.json {name: "./dev/name.png", ...}  (gallery order = key order)
    train/ dev/ test1/                       the images, at the relative paths above
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from cirlab.data.benchmarks import ConversionReport, exists, image_bytes, load_json, write_eval
from cirlab.data.evalset import Protocol
from cirlab.data.shards import write_shards

SPLITS = ("train", "val", "test1")


def _check_rows(rows: Any, path: Path, with_target: bool) -> list[dict[str, Any]]:
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of caption entries, got {type(rows).__name__}")
    need = ("pairid", "reference", "caption") + (("target_hard",) if with_target else ())
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or any(k not in r for k in need):
            raise ValueError(f"{path}: entry {i} lacks one of {need}: {str(r)[:120]}")
    return rows


def convert_cirr(root: str | os.PathLike, out_dir: str | os.PathLike, splits: Sequence[str] = SPLITS,
                 maxcount: int = 1000) -> ConversionReport:
    """Write CIRR as shards: ``out/triplets/train`` and ``out/eval/{val,test1}``.

    Queries carry pairid and subset (the img_set members minus the reference); the protocol removes
    the reference from its ranking, R@{1,5,10,50} and Recall_subset@{1,2,3}; test1 has no targets.
    Images stay PNG (members ``png``/``ref.png``/``tgt.png``).
    """
    root, out = Path(root), Path(out_dir)
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"unknown CIRR splits {bad}; expected some of {', '.join(SPLITS)}")
    base = root / "cirr"
    if not base.is_dir():
        raise FileNotFoundError(f"{base} not found: --root must be the folder holding cirr/ and the image "
                                "folders (train/, dev/, test1/)")
    report = ConversionReport("cirr", out)
    fmt = "png"

    for split in splits:
        cf = base / "captions" / f"cap.rc2.{split}.json"
        sf = base / "image_splits" / f"split.rc2.{split}.json"
        has_targets = split != "test1"
        rows = _check_rows(load_json(cf, f"CIRR {split} captions"), cf, with_target=has_targets)
        rel = load_json(sf, f"CIRR {split} image split")
        if not isinstance(rel, dict):
            raise ValueError(f"{sf}: expected a dict image name -> relative path, got {type(rel).__name__}")
        paths: dict[str, Path] = {}
        for name, rp in rel.items():
            p = root / rp
            if exists(p):
                paths[name] = p
            else:
                report.missing.append(str(p))

        def unknown_or_missing(name: str) -> bool:
            if name not in rel:
                report.note(f"{split}: image named in captions but not in the split file")
                report.missing.append(f"{name} (not in {sf.name})")
            return name not in paths

        if split == "train":
            def triplets() -> Iterator[dict[str, Any]]:
                for r in rows:
                    if unknown_or_missing(r["reference"]) | unknown_or_missing(r["target_hard"]):
                        report.skip("train triplet: reference or target image missing")
                        continue
                    yield {"id": f"cirr-train-{r['pairid']}", "ref": image_bytes(paths[r["reference"]], fmt),
                           "tgt": image_bytes(paths[r["target_hard"]], fmt), "ref_id": r["reference"],
                           "tgt_id": r["target_hard"], "texts": [r["caption"]], "pairid": r["pairid"],
                           "text_format": "plain"}
            idx = write_shards(triplets(), out / "triplets" / "train", "triplet", maxcount, image_format=fmt)
            report.written["triplets/train"] = idx.total
            continue

        def gallery() -> Iterator[dict[str, Any]]:
            for name, p in paths.items():
                yield {"id": name, "image": image_bytes(p, fmt)}

        def queries() -> Iterator[dict[str, Any]]:
            for r in rows:
                missing = unknown_or_missing(r["reference"])
                if has_targets:
                    missing |= unknown_or_missing(r["target_hard"])
                if missing:
                    report.skip(f"{split} query: reference or target image missing")
                    continue
                members = r.get("img_set", {}).get("members", [])
                q = {"id": str(r["pairid"]), "ref": image_bytes(paths[r["reference"]], fmt),
                     "ref_id": r["reference"], "texts": [r["caption"]], "pairid": r["pairid"],
                     "subset": [m for m in members if m != r["reference"]], "text_format": "plain",
                     "target_id": r["target_hard"] if has_targets else None,
                     "gt_ids": [r["target_hard"]] if has_targets else []}
                yield q
        protocol = Protocol(name="cirr", split=split, exclude_reference=True, recall_ks=[1, 5, 10, 50],
                            subset_ks=[1, 2, 3], text_format="plain", has_targets=has_targets, submission="cirr",
                            # CLIP4Cir's model selection: the mean of these 7 (not the (R@5+Rs@1)/2 summary)
                            score_keys=["R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3"])
        es = write_eval(out / "eval" / split, protocol, queries(), gallery(), maxcount, fmt)
        report.written[f"eval/{split}/queries"] = es.queries.total
        report.written[f"eval/{split}/gallery"] = es.gallery.total
    report.save()
    return report
