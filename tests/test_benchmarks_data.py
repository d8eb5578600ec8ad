"""Benchmark readers on tiny fixtures in the official FashionIQ, CIRR and CIRCO layouts."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirlab.train.cli import main as cirlab
from cirlab.data.benchmarks.circo import convert_circo
from cirlab.data.benchmarks.cirr import convert_cirr
from cirlab.data.benchmarks.fashioniq import (caption_variants, clean_caption, convert_fashioniq,
                                              join_captions_eval, join_captions_train)
from cirlab.data.evalset import load_eval_set
from shard_reading import samples, tar_contents_digest


def colour_of(name: str) -> tuple[int, int, int]:
    h = hashlib.md5(name.encode()).digest()
    return (h[0], h[1], h[2])


def save_image(path: Path, name: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour_of(name)).save(path)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def assert_image(img: Image.Image, name: str) -> None:
    """The shard image is the named fixture image (solid colour; JPEG may shift it slightly)."""
    px = np.asarray(img.convert("RGB"), dtype=float).reshape(-1, 3).mean(0)
    assert np.abs(px - np.array(colour_of(name))).max() < 6, name


# ----------------------------------------------------------------------------- FashionIQ text rules
def test_clean_caption_strips_like_clip4cir():
    assert clean_caption(" is longer. ") == "is longer"
    assert clean_caption("?,is red, and blue.?") == "is red, and blue"
    assert clean_caption("has a v-neck") == "has a v-neck"


def test_eval_join_and_variants():
    c1, c2 = "is Darker Blue.", " has short sleeves ,"
    # str.capitalize lower-cases the rest of the first caption, as the reference does
    assert join_captions_eval(c1, c2) == "Is darker blue and has short sleeves"
    v = caption_variants(c1, c2)
    assert v == ["Is darker blue and has short sleeves", "Has short sleeves and is Darker Blue",
                 "Is darker blue", "Has short sleeves"]


def test_train_join_draws_the_four_variants_uniformly():
    rng = random.Random(0)
    variants = caption_variants("is red", "has dots")
    draws = [join_captions_train("is red", "has dots", rng) for _ in range(4000)]
    counts = [draws.count(v) for v in variants]
    assert sum(counts) == 4000
    assert all(abs(c / 4000 - 0.25) < 0.03 for c in counts), counts
    again = [join_captions_train("is red", "has dots", random.Random(0)) for _ in range(3)]
    assert again == [draws[0]] * 3


# ----------------------------------------------------------------------------- FashionIQ conversion
@pytest.fixture()
def fiq_root(tmp_path):
    root = tmp_path / "fashionIQ"
    names = {"dress": [f"d{i}" for i in range(6)], "shirt": [f"s{i}" for i in range(4)]}
    for cat, ns in names.items():
        for n in ns:
            if n != "d5":                      # d5 is listed but was never downloaded
                save_image(root / "images" / f"{n}.jpg", n)
    (root / "images" / "d4.jpg").write_bytes(b"")   # a failed download: empty file = missing
    write_json(root / "captions" / "cap.dress.train.json", [
        {"candidate": "d0", "target": "d1", "captions": ["is red.", "longer"]},
        {"candidate": "d2", "target": "d5", "captions": ["a", "b"]},          # target missing
        {"candidate": "d1", "target": "d2", "captions": ["is shorter", "has dots?"]}])
    write_json(root / "captions" / "cap.shirt.train.json", [
        {"candidate": "s0", "target": "s1", "captions": ["x", "y"]}])
    write_json(root / "captions" / "cap.dress.val.json", [
        {"candidate": "d0", "target": "d2", "captions": ["is blue", "no sleeves"]},
        {"candidate": "d3", "target": "d4", "captions": ["c", "d"]},          # target file empty
        {"candidate": "d1", "target": "d0", "captions": ["e", "f"]}])
    write_json(root / "image_splits" / "split.dress.val.json", ["d3", "d0", "d4", "d2", "d1"])
    write_json(root / "captions" / "cap.shirt.val.json", [
        {"candidate": "s2", "target": "s3", "captions": ["g", "h"]}])
    write_json(root / "image_splits" / "split.shirt.val.json", ["s3", "s2"])
    write_json(root / "captions" / "cap.dress.test.json", [
        {"candidate": "d0", "captions": ["i", "j"]}])
    write_json(root / "image_splits" / "split.dress.test.json", ["d0", "d1"])
    write_json(root / "captions" / "cap.shirt.test.json", [{"candidate": "s0", "captions": ["k", "l"]}])
    write_json(root / "image_splits" / "split.shirt.test.json", ["s0", "s1"])
    return root


def test_fashioniq_train_triplets(fiq_root, tmp_path):
    rep = convert_fashioniq(fiq_root, tmp_path / "out", categories=("dress", "shirt"), splits=("train",))
    trip = samples(tmp_path / "out" / "triplets" / "train")
    assert [(t["category"], t["ref_id"], t["tgt_id"]) for t in trip] == \
        [("dress", "d0", "d1"), ("dress", "d1", "d2"), ("shirt", "s0", "s1")]
    assert trip[0]["texts"] == ["is red.", "longer"] and trip[0]["text_format"] == "fashioniq"
    assert_image(trip[1]["ref.jpg"], "d1")
    assert_image(trip[1]["tgt.jpg"], "d2")
    assert rep.written["triplets/train"] == 3
    assert sum(rep.skipped.values()) == 1


def test_fashioniq_eval_sets_protocol_gallery_and_missing(fiq_root, tmp_path):
    out = tmp_path / "out"
    rep = convert_fashioniq(fiq_root, out, categories=("dress", "shirt"), splits=("val", "test"))
    es = load_eval_set(out / "eval" / "val" / "dress")
    p = es.protocol
    assert (p.name, p.split, p.group, p.exclude_reference, p.recall_ks, p.text_format, p.has_targets) == \
        ("fashioniq-dress", "val", "fashioniq", False, [10, 50], "fashioniq", True)
    gallery = samples(es.root / "gallery")
    assert [g["id"] for g in gallery] == ["d3", "d0", "d2", "d1"]   # split order, d4 missing
    for g in gallery:
        assert_image(g["jpg"], g["id"])
    queries = samples(es.root / "queries")
    assert [(q["ref_id"], q["target_id"], q["gt_ids"]) for q in queries] == \
        [("d0", "d2", ["d2"]), ("d1", "d0", ["d0"])]
    assert queries[0]["texts"] == ["is blue", "no sleeves"] and queries[0]["category"] == "dress"
    assert_image(queries[1]["ref.jpg"], "d1")
    assert rep.skipped == {"val query: reference or target image missing": 1}
    assert load_eval_set(out / "eval" / "val" / "shirt").queries.total == 1
    test = load_eval_set(out / "eval" / "test" / "dress")
    assert test.protocol.has_targets is False and test.queries.total == 1
    assert "target_id" not in samples(test.root / "queries")[0]
    missing = (out / "missing.txt").read_text().split()
    assert sorted(Path(m).stem for m in missing) == ["d4"]
    assert json.loads((out / "report.json").read_text())["missing_images"] == 1


def test_fashioniq_png_images_stay_png_and_conversion_is_deterministic(fiq_root, tmp_path):
    for p in (fiq_root / "images").glob("*.jpg"):
        if p.stat().st_size:
            Image.open(p).save(p.with_suffix(".png"))
        p.unlink()
    convert_fashioniq(fiq_root, tmp_path / "a", categories=("shirt",), splits=("train", "val"))
    convert_fashioniq(fiq_root, tmp_path / "b", categories=("shirt",), splits=("train", "val"))
    g = samples(tmp_path / "a" / "eval" / "val" / "shirt" / "gallery")
    source = np.asarray(Image.open(fiq_root / "images" / "s3.png").convert("RGB"))
    assert g[0]["id"] == "s3" and "png" in g[0]
    np.testing.assert_array_equal(np.asarray(g[0]["png"]), source)   # lossless: the PNG bytes as they were
    assert tar_contents_digest(tmp_path / "a" / "eval") == tar_contents_digest(tmp_path / "b" / "eval")


def test_fashioniq_bad_input_is_named(fiq_root, tmp_path):
    with pytest.raises(ValueError, match="unknown FashionIQ categories"):
        convert_fashioniq(fiq_root, tmp_path / "o", categories=("hat",))
    with pytest.raises(FileNotFoundError, match="cap.toptee.val.json"):
        convert_fashioniq(fiq_root, tmp_path / "o", categories=("toptee",), splits=("val",))
    write_json(fiq_root / "captions" / "cap.shirt.val.json", [{"candidate": "s2", "captions": ["only one"]}])
    with pytest.raises(ValueError, match="entry 0"):
        convert_fashioniq(fiq_root, tmp_path / "o", categories=("shirt",), splits=("val",))


# ----------------------------------------------------------------------------- CIRR
@pytest.fixture()
def cirr_root(tmp_path):
    root = tmp_path / "cirr_dataset"
    splits = {"train": [f"train-{i}-0-img0" for i in range(3)],
              "dev": [f"dev-{i}-0-img0" for i in range(6)],
              "test1": [f"test1-{i}-0-img0" for i in range(4)]}
    for folder, names in splits.items():
        rel = {}
        for n in names:
            sub = f"./{folder}/7/{n}.png" if folder == "train" else f"./{folder}/{n}.png"
            rel[n] = sub
            if n != "dev-5-0-img0":
                save_image(root / sub, n)
        split = {"dev": "val"}.get(folder, folder)
        # gallery order = key order of the split file, deliberately not sorted
        write_json(root / "cirr" / "image_splits" / f"split.rc2.{split}.json", dict(reversed(list(rel.items()))))
    dev = splits["dev"]
    members = dev[:6]
    write_json(root / "cirr" / "captions" / "cap.rc2.train.json", [
        {"pairid": 1, "reference": "train-0-0-img0", "target_hard": "train-1-0-img0", "caption": "add a dog",
         "img_set": {"id": 0, "members": splits["train"]}}])
    write_json(root / "cirr" / "captions" / "cap.rc2.val.json", [
        {"pairid": 10, "reference": dev[0], "target_hard": dev[1], "caption": "Show Two cats.",
         "target_soft": {dev[1]: 1.0}, "img_set": {"id": 3, "members": members}},
        {"pairid": 11, "reference": dev[2], "target_hard": dev[5], "caption": "missing target",
         "img_set": {"id": 3, "members": members}},
        {"pairid": 12, "reference": dev[3], "target_hard": dev[0], "caption": "zoom out",
         "img_set": {"id": 3, "members": members}}])
    write_json(root / "cirr" / "captions" / "cap.rc2.test1.json", [
        {"pairid": 20, "reference": "test1-2-0-img0", "caption": "mirror it",
         "img_set": {"id": 9, "members": splits["test1"]}}])
    return root


def test_cirr_conversion(cirr_root, tmp_path):
    out = tmp_path / "out"
    rep = convert_cirr(cirr_root, out)
    trip = samples(out / "triplets" / "train")
    assert len(trip) == 1 and trip[0]["texts"] == ["add a dog"] and trip[0]["pairid"] == 1
    assert_image(trip[0]["tgt.png"], "train-1-0-img0")

    val = load_eval_set(out / "eval" / "val")
    p = val.protocol
    assert (p.name, p.exclude_reference, p.recall_ks, p.subset_ks, p.text_format, p.has_targets) == \
        ("cirr", True, [1, 5, 10, 50], [1, 2, 3], "plain", True)
    gallery = samples(val.root / "gallery")
    assert [g["id"] for g in gallery] == [f"dev-{i}-0-img0" for i in (4, 3, 2, 1, 0)]  # key order, 5 missing
    for g in gallery:
        assert_image(g["png"], g["id"])
    queries = samples(val.root / "queries")
    assert [q["pairid"] for q in queries] == [10, 12]
    q = queries[0]
    assert q["texts"] == ["Show Two cats."] and q["target_id"] == "dev-1-0-img0" and q["gt_ids"] == ["dev-1-0-img0"]
    assert q["subset"] == [f"dev-{i}-0-img0" for i in (1, 2, 3, 4, 5)]   # members minus the reference
    assert q["ref_id"] not in q["subset"]
    assert_image(q["ref.png"], "dev-0-0-img0")
    assert rep.skipped == {"val query: reference or target image missing": 1}
    assert (out / "missing.txt").read_text().count("dev-5-0-img0") == 1

    test = load_eval_set(out / "eval" / "test1")
    assert test.protocol.has_targets is False and test.gallery.total == 4
    (tq,) = samples(test.root / "queries")
    assert tq["target_id"] is None and tq["gt_ids"] == [] and tq["id"] == "20"
    assert len(tq["subset"]) == 3


def test_cirr_bad_root_and_split(cirr_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="cirr/"):
        convert_cirr(cirr_root / "cirr", tmp_path / "o")
    with pytest.raises(ValueError, match="unknown CIRR splits"):
        convert_cirr(cirr_root, tmp_path / "o", splits=("test",))


# ----------------------------------------------------------------------------- CIRCO
@pytest.fixture(params=["files", "image_info"])
def circo_root(tmp_path, request):
    root = tmp_path / "CIRCO"
    folder = root / "COCO2017_unlabeled" / "unlabeled2017"
    ids = [31, 7, 512, 1024, 99]
    for i in ids:
        save_image(folder / f"{i:012d}.jpg", str(i))
    if request.param == "image_info":   # the official order (not sorted) plus one image never downloaded
        write_json(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json",
                   {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids + [5]]})
    write_json(root / "annotations" / "val.json", [
        {"id": 0, "reference_img_id": 31, "target_img_id": 512, "relative_caption": "is blue",
         "shared_concept": "a dog", "gt_img_ids": [512, 99]},
        {"id": 1, "reference_img_id": 7, "target_img_id": 1024, "relative_caption": "is at night",
         "shared_concept": "a street", "gt_img_ids": [1024]}])
    write_json(root / "annotations" / "test.json", [
        {"id": 0, "reference_img_id": 99, "relative_caption": "has two of them", "shared_concept": "a cup"}])
    return root, request.param


def test_circo_conversion(circo_root, tmp_path):
    circo_root, layout = circo_root
    out = tmp_path / "out"
    rep = convert_circo(circo_root, out)
    val = load_eval_set(out / "eval" / "val")
    p = val.protocol
    # the reference evaluation reports Recall@K of the target next to mAP@K; selection is by mAP
    assert (p.name, p.exclude_reference, p.recall_ks, p.map_ks, p.has_targets, p.submission) == \
        ("circo", False, [5, 10, 25, 50], [5, 10, 25, 50], True, "circo")
    assert p.score_keys == ["mAP@5", "mAP@10", "mAP@25", "mAP@50"]
    gallery = samples(val.root / "gallery")          # read through the shared gallery's index
    expected = ["31", "7", "512", "1024", "99"] if layout == "image_info" else ["7", "31", "99", "512", "1024"]
    assert [g["id"] for g in gallery] == expected
    for g in gallery:
        assert_image(g["jpg"], g["id"])
    assert not any((out / "eval" / "val" / "gallery").glob("*.tar"))   # not copied
    queries = samples(val.root / "queries")
    assert [(q["ref_id"], q["target_id"], q["gt_ids"]) for q in queries] == \
        [("31", "512", ["512", "99"]), ("7", "1024", ["1024"])]
    assert queries[0]["texts"] == ["is blue"] and queries[0]["shared_concept"] == "a dog"
    assert_image(queries[1]["ref.jpg"], "7")
    test = load_eval_set(out / "eval" / "test")
    assert test.protocol.has_targets is False and test.gallery.total == 5
    (tq,) = samples(test.root / "queries")
    assert tq["gt_ids"] == [] and tq["target_id"] is None and tq["texts"] == ["has two of them"]
    assert rep.written == {"gallery": 5, "eval/val/queries": 2, "eval/test/queries": 1}
    n_missing = 1 if layout == "image_info" else 0
    assert json.loads((out / "report.json").read_text())["missing_images"] == n_missing


# ----------------------------------------------------------------------------- CLI
def test_cli(cirr_root, tmp_path, capsys):
    assert cirlab(["data", "cirr", "--root", str(cirr_root), "--out", str(tmp_path / "o"), "--splits", "val"]) == 0
    assert "eval/val/queries: 2" in capsys.readouterr().out
    assert not (tmp_path / "o" / "triplets").exists()
    # user mistakes: one error line (and a hint), exit 2
    assert cirlab(["data", "circo", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cirlab data: error: --root") and "is not a folder" in err and len(err.splitlines()) <= 2
    assert cirlab(["data", "fashioniq", "--root", str(cirr_root), "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert "images" in err and len(err.splitlines()) <= 2
    assert cirlab(["data", "synthetic", "--out", str(tmp_path / "w"), "--scenes", "5", "--queries", "3"]) == 0
    assert (tmp_path / "w" / "world.json").is_file()
