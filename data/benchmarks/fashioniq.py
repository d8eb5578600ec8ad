"""FashionIQ: caption joining rules (as CLIP4Cir does it) and conversion of the official files to shards.

Official layout under ROOT::

    captions/cap.{category}.{split}.json       [{"candidate", "target", "captions": [c1, c2]}, ...]
    image_splits/split.{category}.{split}.json  [name, ...]
    images/{name}.jpg                           (.png accepted: CLIP4Cir's copy of the images)
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Iterator, Protocol as TypingProtocol, Sequence

from cirlab.data.benchmarks import ConversionReport, exists, image_bytes, load_json, write_eval
from cirlab.data.evalset import Protocol
from cirlab.data.shards import write_shards

CATEGORIES = ("dress", "shirt", "toptee")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


class _Random(TypingProtocol):
    def random(self) -> float: ...


def clean_caption(c: str) -> str:
    """Strip '.', '?', ',' and spaces from both ends — CLIP4Cir's ``strip('.?, ')``."""
    return c.strip(".?, ")


def _cap(c: str) -> str:
    # str.capitalize, as the reference: first letter upper case, the REST LOWER-CASED.
    return clean_caption(c).capitalize()


def caption_variants(c1: str, c2: str) -> list[str]:
    """The four training joins, in a fixed order: "C1 and c2", "C2 and c1", "C1", "C2" (stage-2 cache)."""
    return [f"{_cap(c1)} and {clean_caption(c2)}", f"{_cap(c2)} and {clean_caption(c1)}", _cap(c1), _cap(c2)]


def join_captions_train(c1: str, c2: str, rng: _Random | None = None) -> str:
    """One of the four variants, each with probability 1/4 (CLIP4Cir's training augmentation)."""
    r = (rng or random).random()
    return caption_variants(c1, c2)[min(int(r * 4), 3)]


def join_captions_eval(c1: str, c2: str) -> str:
    """The evaluation text, always "C1 and c2"."""
    return f"{_cap(c1)} and {clean_caption(c2)}"


def _image_path(images: Path, name: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        p = images / f"{name}{suffix}"
        if exists(p):
            return p
    return None


def _image_format(images: Path) -> str:
    """PNG when the image folder holds PNGs (CLIP4Cir's copy), else JPEG; mismatching files are re-encoded."""
    with os.scandir(images) as it:
        for entry in it:
            low = entry.name.lower()
            if low.endswith(".png"):
                return "png"
            if low.endswith((".jpg", ".jpeg")):
                return "jpeg"
    return "jpeg"


def _check_triplets(rows: Any, path: Path) -> list[dict[str, Any]]:
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of {{candidate, target, captions}}, got {type(rows).__name__}")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "candidate" not in r or not isinstance(r.get("captions"), list) \
                or len(r["captions"]) != 2:
            raise ValueError(f"{path}: entry {i} is not {{candidate, target, captions: [c1, c2]}}: {str(r)[:120]}")
    return rows


def convert_fashioniq(root: str | os.PathLike, out_dir: str | os.PathLike,
                      categories: Sequence[str] = CATEGORIES, splits: Sequence[str] = ("train", "val"),
                      maxcount: int = 1000) -> ConversionReport:
    """Write FashionIQ as shards: train triplets of all categories, one evaluation set per (category, split).

    ``out/triplets/train`` (texts=[c1, c2], text_format "fashioniq", category) and
    ``out/eval/{split}/{category}`` (Protocol fashioniq-{category}, group "fashioniq", reference not
    excluded, R@10/50; gallery = the category's split images in file order). Queries without a
    target (the test split) give has_targets False.
    """
    root, out = Path(root), Path(out_dir)
    bad = [c for c in categories if c not in CATEGORIES]
    if bad:
        raise ValueError(f"unknown FashionIQ categories {bad}; expected some of {', '.join(CATEGORIES)}")
    images = root / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"FashionIQ images folder not found at {images}: --root must hold images/")
    fmt = _image_format(images)
    report = ConversionReport("fashioniq", out)

    def path_or_missing(name: str) -> Path | None:
        p = _image_path(images, name)
        if p is None:
            report.missing.append(str(images / f"{name}.jpg"))
        return p

    for split in splits:
        if split == "train":
            rows_by_cat = {}
            for cat in categories:
                f = root / "captions" / f"cap.{cat}.train.json"
                rows_by_cat[cat] = _check_triplets(load_json(f, f"FashionIQ {cat} train captions"), f)

            def triplets() -> Iterator[dict[str, Any]]:
                for cat, rows in rows_by_cat.items():
                    for i, r in enumerate(rows):
                        ref, tgt = path_or_missing(r["candidate"]), path_or_missing(r["target"])
                        if ref is None or tgt is None:
                            report.skip("train triplet: reference or target image missing")
                            continue
                        yield {"id": f"fashioniq-{cat}-train-{i:06d}", "ref": image_bytes(ref, fmt),
                               "tgt": image_bytes(tgt, fmt), "ref_id": r["candidate"], "tgt_id": r["target"],
                               "texts": list(r["captions"]), "text_format": "fashioniq", "category": cat}
            idx = write_shards(triplets(), out / "triplets" / "train", "triplet", maxcount, image_format=fmt)
            report.written["triplets/train"] = idx.total
            continue
        for cat in categories:
            cf = root / "captions" / f"cap.{cat}.{split}.json"
            sf = root / "image_splits" / f"split.{cat}.{split}.json"
            rows = _check_triplets(load_json(cf, f"FashionIQ {cat} {split} captions"), cf)
            names = load_json(sf, f"FashionIQ {cat} {split} image split")
            if not isinstance(names, list):
                raise ValueError(f"{sf}: expected a list of image names, got {type(names).__name__}")
            present = {n: p for n in names if (p := path_or_missing(n)) is not None}
            has_targets = all("target" in r for r in rows)

            def gallery() -> Iterator[dict[str, Any]]:
                for n, p in present.items():
                    yield {"id": n, "image": image_bytes(p, fmt)}

            def queries() -> Iterator[dict[str, Any]]:
                for i, r in enumerate(rows):
                    ref = _image_path(images, r["candidate"])
                    tgt_ok = not has_targets or _image_path(images, r["target"]) is not None
                    if ref is None or not tgt_ok:
                        if ref is None:
                            report.missing.append(str(images / f"{r['candidate']}.jpg"))
                        if not tgt_ok:
                            report.missing.append(str(images / f"{r['target']}.jpg"))
                        report.skip(f"{split} query: reference or target image missing")
                        continue
                    q = {"id": f"fashioniq-{cat}-{split}-{i:06d}", "ref": image_bytes(ref, fmt),
                         "ref_id": r["candidate"], "texts": list(r["captions"]), "category": cat,
                         "text_format": "fashioniq"}
                    if has_targets:
                        q["target_id"], q["gt_ids"] = r["target"], [r["target"]]
                        if r["target"] not in present:
                            report.note(f"{split} query whose target is not in the {split} gallery")
                    yield q
            protocol = Protocol(name=f"fashioniq-{cat}", split=split, exclude_reference=False,
                                recall_ks=[10, 50], text_format="fashioniq", group="fashioniq",
                                has_targets=has_targets, score_keys=["R@10", "R@50"])
            es = write_eval(out / "eval" / split / cat, protocol, queries(), gallery(), maxcount, fmt)
            report.written[f"eval/{split}/{cat}/queries"] = es.queries.total
            report.written[f"eval/{split}/{cat}/gallery"] = es.gallery.total
    report.save()
    return report
