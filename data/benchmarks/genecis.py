"""GeneCIS (facebookresearch/genecis, METHODS.md "GeneCIS"): four conditional tasks, per-query galleries.

Files ``genecis/{focus,change}_{attribute,object}.json``: lists of ``{reference, target, condition,
gallery: [...]}``. Object tasks name COCO val2017 images (``{"val_image_id": int}`` ->
``<coco_root>/<id:012d>.jpg``); attribute tasks name Visual Genome images with an object box
(``{"image_id", "instance_bbox": [x, y, w, h]}`` -> ``<vg_root>/<image_id>.jpg``), cropped, dilated
and padded to square as the benchmark's VAW loader does (`crop_dilate_pad`). Each query ranks its
own gallery = [target] + gallery (the target is index 0 by construction, the reference is not in
it); Recall@1/2/3 = share of queries whose target is in the top K (`genecis_recall`, the
benchmark's get_recall for one target per query). The eval set written here holds every distinct
image once in gallery/; each query carries ``gallery``: its ids, target first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image

from cirlab.data.evalset import EvalSet, Protocol, write_eval_set
from cirlab.errors import CirlabError

TASKS = ("focus_attribute", "change_attribute", "focus_object", "change_object")
DILATION = 0.7  # the benchmark's VAW loader


def crop_dilate_pad(im: Image.Image, bbox: Sequence[float], dilation: float = DILATION) -> Image.Image:
    """The benchmark's attribute-task crop: the box grown by `dilation` (its own arithmetic), black-padded square."""
    w, h = bbox[2], bbox[3]
    if dilation:
        left, top = max(0, bbox[0] - dilation * w), max(0, bbox[1] - dilation * h)
        # as the reference: right/bottom from the dilated left/top, not from the box's own corner
        right, bottom = min(im.width, left + (1 + dilation) * w), min(im.height, top + (1 + dilation) * h)
    else:
        left, top, right, bottom = bbox[0], bbox[1], bbox[0] + w, bbox[1] + h
    im = im.crop((left, top, right, bottom))
    if im.width == im.height:
        return im
    side = max(im.width, im.height)
    out = Image.new(im.mode, (side, side), (0,) if im.mode == "L" else (0, 0, 0))
    out.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    return out


def genecis_recall(ranked: Sequence[Sequence[Any]], targets: Sequence[Any], ks: Sequence[int] = (1, 2, 3)
                   ) -> dict[int, float]:
    """Recall@K in percent over per-query rankings of their own galleries (one target per query)."""
    if len(ranked) != len(targets) or not ranked:
        raise ValueError(f"{len(ranked)} rankings for {len(targets)} targets; pass one of each per query")
    return {k: 100.0 * sum(t in list(r)[:k] for r, t in zip(ranked, targets)) / len(ranked) for k in ks}


def _item_id(task: str, item: dict[str, Any]) -> str:
    if task.endswith("object"):
        return f"coco-{int(item['val_image_id']):012d}"
    box = ",".join(f"{float(v):g}" for v in item["instance_bbox"])
    return f"vg-{item['image_id']}-{box}"


def _load_item(task: str, item: dict[str, Any], coco_root: Path | None, vg_root: Path | None) -> Image.Image:
    if task.endswith("object"):
        path = Path(coco_root) / f"{int(item['val_image_id']):012d}.jpg"
    else:
        path = Path(vg_root) / f"{item['image_id']}.jpg"
    if not path.is_file():
        root = "coco_root (COCO val2017)" if task.endswith("object") else "vg_root (Visual Genome images)"
        raise CirlabError(f"GeneCIS {task}: image {path} not found", f"point {root} at the folder holding it")
    im = Image.open(path).convert("RGB")
    return im if task.endswith("object") else crop_dilate_pad(im, item["instance_bbox"])


def convert_genecis(json_path: str | os.PathLike, task: str, out: str | os.PathLike,
                    coco_root: str | os.PathLike | None = None, vg_root: str | os.PathLike | None = None,
                    maxcount: int = 1000) -> EvalSet:
    """Write one GeneCIS task as an evaluation set whose queries carry their own `gallery` of ids."""
    if task not in TASKS:
        raise CirlabError(f"unknown GeneCIS task {task!r}", f"one of {', '.join(TASKS)}")
    root = coco_root if task.endswith("object") else vg_root
    if root is None:
        raise CirlabError(f"GeneCIS {task} needs {'coco_root' if task.endswith('object') else 'vg_root'}",
                          "pass the image folder the annotations name")
    samples = json.loads(Path(json_path).read_text())
    if not isinstance(samples, list) or not samples:
        raise CirlabError(f"{json_path}: expected a non-empty JSON list of GeneCIS samples")
    images: dict[str, Image.Image] = {}

    def image(item: dict[str, Any]) -> str:
        key = _item_id(task, item)
        if key not in images:
            images[key] = _load_item(task, item, coco_root and Path(coco_root), vg_root and Path(vg_root))
        return key

    queries = []
    for i, s in enumerate(samples):
        try:
            ref, tgt = image(s["reference"]), image(s["target"])
            gallery = [tgt] + [image(g) for g in s["gallery"]]
            condition = str(s["condition"])
        except (KeyError, TypeError) as e:
            raise CirlabError(f"{json_path}: sample {i} lacks {e} (GeneCIS samples hold reference, target, "
                              "condition and gallery)") from None
        queries.append({"id": f"{task}-{i:05d}", "ref": images[ref], "ref_id": ref, "texts": [condition],
                        "target_id": tgt, "gt_ids": [tgt], "gallery": gallery, "text_format": "plain"})

    def gallery_samples() -> Iterator[dict[str, Any]]:
        for key, im in images.items():
            yield {"id": key, "image": im}

    protocol = Protocol(name=f"genecis-{task.replace('_', '-')}", split="val", recall_ks=[1, 2, 3],
                        text_format="plain", group="genecis", score_keys=["R@1", "R@2", "R@3"],
                        per_query_gallery=True)
    return write_eval_set(out, protocol, iter(queries), gallery_samples(), maxcount=maxcount)
