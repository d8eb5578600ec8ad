"""A new user's mistakes through `cirlab data convert`: each is one `cirlab data: error:` line (plus a
hint) with exit code 2 and nothing written, or it converts correctly (BOM files, 16-bit images).
Evaluation sets from your own queries and gallery (`--kind evalset`), and the long-text counter."""

from __future__ import annotations

import csv
import json
import logging
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirlab.data.convert import BadRowError, ConvertError, convert
from cirlab.data.images import decode_rgb
from cirlab.data.streaming import ShardStream, StreamLoader, decode_image, make_dataset
from cirlab.errors import CirlabError

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG (greyscale for 2-D, RGB for HxWx3 arrays), written by hand: PIL cannot write 16-bit RGB."""
    h, w = values.shape[:2]
    colour_type = 2 if values.ndim == 3 else 0
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def cirlab(capsys, *args: str) -> tuple[int, str, str]:
    """Run `cirlab ARGS` in this process (the console script's own main); (exit code, stdout, stderr)."""
    from cirlab.train.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def cirlab_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m cirlab.train.cli ARGS` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "cirlab.train.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, check=False)


def after_lightning(err: str, command: str) -> str:
    """stderr from cirlab's error line on: Lightning's own lines ("Seed set to 0", "GPU available ...") come first."""
    start = err.find(f"cirlab {command}: error: ")
    return err[start:] if start >= 0 else err


def assert_one_error(code: int, err: str, command: str, *fragments: str) -> str:
    """Exit 2 and stderr = one `cirlab <command>: error: …` line (+ an optional `  hint:` line)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert 1 <= len(lines) <= 2 and lines[0].startswith(f"cirlab {command}: error: "), err
    assert len(lines) == 1 or lines[1].startswith("  hint: "), err
    text = " ".join(lines)
    for f in fragments:
        assert f in text, (f, text)
    assert "Traceback" not in err
    return text


@pytest.fixture()
def images(tmp_path) -> Path:
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.png", "sub/c.png"):
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(root / name)
    (root / "empty.jpg").write_bytes(b"")
    return root


def _convert_args(kind: str, rows: Path, images: Path, out: Path, *more: str) -> list[str]:
    return ["data", "convert", "--kind", kind, "--rows", str(rows), "--images", str(images), "--out", str(out), *more]


def _stream(folder: Path, kind: str) -> list[dict]:
    return list(StreamLoader(make_dataset(folder, kind, resampled=False)))


# --------------------------------------------------------------------------- CSV: BOM and headers


def test_a_csv_with_a_byte_order_mark_converts(tmp_path, images, capsys):
    rows = tmp_path / "excel.csv"
    rows.write_bytes("\ufeffreference,target,text\na.jpg,b.png,is red\nb.png,sub/c.png,is bigger\n".encode("utf-8"))
    code, out, err = cirlab(capsys, *_convert_args("triplet", rows, images, tmp_path / "out"))
    assert code == 0, err
    got = sorted((s["ref_id"], s["tgt_id"], s["texts"][0]) for s in _stream(tmp_path / "out", "triplet"))
    assert got == [("a", "b", "is red"), ("b", "sub/c", "is bigger")]
    jsonl = tmp_path / "bom.jsonl"  # a JSONL file saved by the same editor
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "a dog"}).encode() + b"\n")
    assert convert("text", jsonl, None, tmp_path / "t").written == 1


@pytest.mark.parametrize("kind,header,fragments", [
    ("triplet", "ref,tgt,caption", ["['ref', 'tgt', 'caption']", "'reference', 'target'", "missing 'reference'"]),
    ("pair", "img,txt", ["['img', 'txt']", "'image', 'text' or 'caption'"]),
    ("instruction", "image,question,answer", ["missing 'instruction'"]),
    ("pair", "Image,Text", ["case-sensitive", "'Image' -> 'image'"]),
    ("pair", "image;text", ["not comma-separated"]),
])
def test_a_csv_header_without_the_kinds_columns_is_one_error(tmp_path, images, capsys, kind, header, fragments):
    rows = tmp_path / "rows.csv"
    rows.write_text(header + "\n" + ",".join(["a.jpg"] * len(header.split(","))) + "\n")
    with pytest.raises(ConvertError):  # the library raises; the command prints it
        convert(kind, rows, images, tmp_path / "lib")
    code, out, err = cirlab(capsys, *_convert_args(kind, rows, images, tmp_path / "out"))
    assert_one_error(code, err, "data", "the CSV header names columns", *fragments)
    assert not (tmp_path / "out").exists() and not (tmp_path / "lib").exists()


def test_a_file_that_is_not_utf8_is_one_error(tmp_path, images, capsys):
    rows = tmp_path / "latin1.csv"
    rows.write_bytes("image,text\na.jpg,caf\xe9 au lait\n".encode("latin-1"))
    code, _, err = cirlab(capsys, *_convert_args("pair", rows, images, tmp_path / "out"))
    assert_one_error(code, err, "data", "is not UTF-8", "0xe9", "CSV UTF-8")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 0 samples, strict


@pytest.mark.parametrize("lines,fragments", [
    ([{"ref": "a.jpg", "tgt": "b.png", "caption": "x"}] * 3, ["all 3 rows", "missing field: 3", "missing field 'reference'"]),
    ([{"reference": "a.jpg", "target": "nope.png", "text": "x"}], ["all 1 rows", "missing image: 1", "nope.png"]),
    ([{"reference": "a.jpg", "target": "empty.jpg", "text": "x"}], ["bad image: 1", "empty file (0 bytes)"]),
    ([], ["holds no rows"]),
])
def test_a_conversion_that_writes_no_sample_fails_and_leaves_nothing(tmp_path, images, capsys, lines, fragments):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in lines))
    code, out, err = cirlab(capsys, *_convert_args("triplet", rows, images, tmp_path / "out"))
    assert_one_error(code, err, "data", *fragments)
    assert not (tmp_path / "out").exists()


def test_zero_samples_exit_non_zero_in_a_fresh_process(tmp_path, images):
    rows = tmp_path / "rows.csv"
    rows.write_text("reference,target,text\n")  # a header and nothing else
    r = cirlab_process(*_convert_args("triplet", rows, images, tmp_path / "out"), cwd=tmp_path)
    assert r.returncode != 0 and "holds no rows" in r.stderr
    assert_one_error(r.returncode, r.stderr, "data")
    assert not (tmp_path / "out").exists()


def _triplets(n_good: int, bad_at: int | None) -> list[dict]:
    rows = [{"reference": "a.jpg", "target": "b.png", "text": f"edit {i}"} for i in range(n_good)]
    if bad_at is not None:
        rows.insert(bad_at, {"reference": "a.jpg", "target": "gone.png", "text": "bad"})
    return rows


def test_strict_leaves_nothing_behind_and_keeps_an_earlier_set(tmp_path, images, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in _triplets(4, bad_at=3)))
    # shards of one sample: three were complete when the bad row came
    code, _, err = cirlab(capsys, *_convert_args("triplet", rows, images, tmp_path / "new", "--strict", "--maxcount", "1"))
    assert_one_error(code, err, "data", f"{rows}:4: image file not found", "gone.png", "--strict")
    assert not (tmp_path / "new").exists()
    # an earlier conversion in the folder stays exactly as it was
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in _triplets(2, None)))
    out = tmp_path / "kept"
    assert cirlab(capsys, *_convert_args("triplet", good, images, out, "--maxcount", "1"))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = cirlab(capsys, *_convert_args("triplet", rows, images, out, "--strict", "--maxcount", "1"))
    assert code == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(before) == ["index.json", "shard-000000.tar", "shard-000001.tar"]
    # a later complete conversion replaces the set and removes shards the new index no longer lists
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(_triplets(1, None)[0]) + "\n")
    assert convert("triplet", one, images, out).index.total == 1
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar"]


def test_strict_mode_in_python_raises_the_row_error(tmp_path, images):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in _triplets(2, bad_at=1)))
    with pytest.raises(BadRowError, match=f"^{re.escape(str(rows))}:2: image file not found") as info:
        convert("triplet", rows, images, tmp_path / "o", strict=True)
    assert isinstance(info.value, CirlabError) and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- text fields say what is wrong


TEXT_CASES = [  # (text value in JSONL, what the problem says)
    ("", "field 'text' is empty"),
    ("   ", "field 'text' holds only whitespace"),
    ("\t\n", "field 'text' holds only whitespace"),
    (42, "field 'text' is a number (42), not a string"),
    (3.5, "field 'text' is a number (3.5), not a string"),
    (None, "field 'text' is null"),
    (True, "field 'text' is true, not a string"),
    (["a", "b"], "field 'text' is a list, not a string"),
    ({"en": "x"}, "field 'text' is a JSON object, not a string"),
]


def test_bad_texts_say_what_is_wrong_for_every_kind(tmp_path, images):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"image": "a.jpg", "text": v}) + "\n" for v, _ in TEXT_CASES)
                    + json.dumps({"image": "a.jpg"}) + "\n" + json.dumps({"image": "a.jpg", "text": "fine"}) + "\n")
    report = convert("pair", rows, images, tmp_path / "pair")
    assert report.written == 1 and report.skipped == len(TEXT_CASES) + 1
    for problem, (_, why) in zip(report.problems, TEXT_CASES):
        assert why in problem and "missing" not in problem, problem
    assert "missing field 'text' (or 'caption')" in report.problems[-1]  # only an absent field is "missing"
    assert report.skipped_by_reason == {"bad field": len(TEXT_CASES), "missing field": 1}
    # the same words for the other kinds' text fields
    cases = {
        "text": ({"text": " "}, "field 'text' holds only whitespace"),
        "instruction": ({"image": "a.jpg", "instruction": "what?", "answer": 7}, "field 'answer' is a number (7)"),
        "triplet": ({"reference": "a.jpg", "target": "b.png", "texts": ["ok", ""]}, "field 'texts': text 2 of 2 is empty"),
    }
    for kind, (row, why) in cases.items():
        f = tmp_path / f"{kind}.jsonl"
        f.write_text(json.dumps(row) + "\n")
        with pytest.raises(BadRowError, match=re.escape(why)):
            convert(kind, f, images, tmp_path / kind, strict=True)
    f = tmp_path / "path.jsonl"
    f.write_text(json.dumps({"image": 17, "text": "x"}) + "\n")
    with pytest.raises(BadRowError, match=re.escape("field 'image' is a number (17)")):
        convert("pair", f, images, tmp_path / "p2", strict=True)


def test_bad_texts_in_csv_cells(tmp_path, images, capsys):
    rows = tmp_path / "rows.csv"
    with rows.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([["image", "text", "id"], ["a.jpg", "", "1"], ["a.jpg", "   ", "2"], ["a.jpg", "ok", ""]])
    report = convert("pair", rows, images, tmp_path / "o")
    assert report.written == 1 and report.problems == [f"{rows}:2: field 'text' is empty",
                                                       f"{rows}:3: field 'text' holds only whitespace"]
    (s,) = _stream(tmp_path / "o", "pair")
    assert s["id"] == "a" and "id" not in {k for k, v in s.items() if v == ""}  # an empty id cell is no id
    code, _, err = cirlab(capsys, *_convert_args("pair", rows, images, tmp_path / "strict", "--strict"))
    assert_one_error(code, err, "data", f"{rows}:2: field 'text' is empty")


# --------------------------------------------------------------------------- 16-bit images


def _sixteen_bit_images(root: Path) -> dict[str, np.ndarray]:
    """16-bit greyscale and RGB PNGs and the 8-bit images they must decode to (top byte), by file name."""
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 65536, (10, 14), dtype=np.uint16)
    grey[0, :4] = [0, 255, 65280, 65535]  # 0..65535: 255 alone would turn black, 65280+ white
    rgb = rng.integers(0, 65536, (10, 14, 3), dtype=np.uint16)
    (root / "grey16.png").write_bytes(png16(grey))
    (root / "rgb16.png").write_bytes(png16(rgb))
    Image.fromarray(grey).save(root / "grey16-pil.png")  # PIL's own I;16 writer
    want_grey = np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=-1)
    return {"grey16.png": want_grey, "rgb16.png": (rgb >> 8).astype(np.uint8), "grey16-pil.png": want_grey}


def test_16_bit_pngs_are_scaled_not_clipped(tmp_path, images, capsys):
    expected = _sixteen_bit_images(images)
    for name, want in expected.items():  # the decoder itself, on bytes and on a path
        data = (images / name).read_bytes()
        assert np.array_equal(np.asarray(decode_image(data)), want), name
        assert np.array_equal(np.asarray(decode_rgb(images / name)), want), name
    assert expected["grey16.png"][0, :4, 0].tolist() == [0, 0, 255, 255]
    from cirlab.data.shards import encode_image  # a 16-bit PIL image handed to the shard writer

    flat = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    assert np.abs(np.asarray(decode_rgb(encode_image(flat, "jpeg"))).astype(int) - 40000 // 256).max() <= 1
    assert np.asarray(decode_rgb(encode_image(flat, "png"))).tolist() == [[[156] * 3] * 8] * 8
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"image": n, "text": n}) + "\n" for n in expected))
    for fmt in ("png", "jpeg"):
        code, _, err = cirlab(capsys, *_convert_args("pair", rows, images, tmp_path / fmt, "--image-format", fmt))
        assert code == 0, err
        got = {s["text"]: np.asarray(s["image"]).astype(int) for s in _stream(tmp_path / fmt, "pair")}
        for name, want in expected.items():
            tol = 0 if fmt == "png" or name == "rgb16.png" else 40  # JPEG is lossy; the 16-bit RGB PNG is kept as is
            assert np.abs(got[name] - want).max() <= tol, (fmt, name)
            assert got[name].mean() < 200  # the old clipping made these nearly all white (255)


# --------------------------------------------------------------------------- missing inputs


def test_missing_inputs_are_one_error(tmp_path, images, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"image": "a.jpg", "text": "x"}) + "\n")
    for args, fragments in [
        (_convert_args("pair", tmp_path / "nope.jsonl", images, tmp_path / "o"), ["rows file", "nope.jsonl", "does not exist"]),
        (_convert_args("pair", rows, tmp_path / "nodir", tmp_path / "o"), ["image folder", "nodir", "--images"]),
        (_convert_args("pair", tmp_path / "rows.txt", images, tmp_path / "o"), ["must end in .jsonl or .csv"]),
    ]:
        if "rows.txt" in args[5]:
            (tmp_path / "rows.txt").write_text("x\n")
        code, _, err = cirlab(capsys, *args)
        assert_one_error(code, err, "data", *fragments)
        assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- --kind evalset


@pytest.fixture()
def gallery(tmp_path) -> Path:
    """shoes/s0..s5 (random), shoes/s0-copy (s0's pixels), a 16-bit PNG and a 0-byte file."""
    g = tmp_path / "gallery"
    (g / "shoes").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(g / "shoes" / f"s{i}.png")
    (g / "shoes" / "s0-copy.png").write_bytes((g / "shoes" / "s0.png").read_bytes())
    (g / "deep16.png").write_bytes(png16(rng.integers(0, 65536, (24, 24), dtype=np.uint16)))
    (g / "broken.jpg").write_bytes(b"")
    return g


def _evalset_args(queries: Path, gallery: Path, out: Path, *more: str) -> list[str]:
    return ["data", "convert", "--kind", "evalset", "--queries", str(queries), "--gallery", str(gallery),
            "--out", str(out), *more]


def test_an_evaluation_set_from_your_own_queries(tmp_path, gallery, capsys):
    from cirlab.data.evalset import load_eval_set

    q = tmp_path / "q.jsonl"
    q.write_text("\n".join(json.dumps(r) for r in [
        {"reference": "shoes/s0.png", "text": "the same shoe", "target": "shoes/s0-copy.png", "style": "x"},
        {"id": "two", "reference": "shoes/s1", "texts": ["darker, in leather"], "targets": ["shoes/s2", "deep16"]},
        {"reference": "shoes/s3", "text": "", "target": "shoes/s4"},           # 3: empty text
        {"reference": "shoes/s3", "text": "x", "target": "broken"},            # 4: an unreadable gallery file
        {"reference": "shoes/s3", "text": "x", "target": "shoes/s9"},          # 5: not in the gallery
        {"reference": "shoes/s3", "text": "x"},                                # 6: no target
        {"reference": "shoes/s3", "texts": ["a", "b"], "target": "shoes/s4"},  # 7: two texts
    ]) + "\n")
    code, out, err = cirlab(capsys, *_evalset_args(q, gallery, tmp_path / "eval", "--exclude-reference",
                                                   "--metrics", "recall,map"))
    assert code == 0, err
    assert "2 queries, 8 gallery images" in out and "skipped 1 unreadable gallery images" in out
    assert "broken.jpg: empty file (0 bytes)" in out and "skipped 5 rows" in out
    for no, why in [(3, "field 'text' is empty"), (4, "target 'broken' is an unreadable gallery image"),
                    (5, "target 'shoes/s9' is not in the gallery"), (6, "missing field 'target' (or 'targets')"),
                    (7, "the query has 2 texts, but a plain query is read as one")]:
        assert f"{q}:{no}: {why}" in out
    es = load_eval_set(tmp_path / "eval")
    p = es.protocol
    assert (p.name, p.text_format, p.exclude_reference, p.has_targets) == ("custom", "plain", True, True)
    assert p.recall_ks == [1, 5] and p.map_ks == [5, 10, 25, 50]  # R@10/50 >= 7 rankable images: always 100
    assert "R@10, R@50 left out" in out
    gallery_ids = [s["id"] for s in ShardStream(tmp_path / "eval" / "gallery", "image", resampled=False, shuffle=False,
                                                shuffle_buffer=0, batch_size=None, rank=0, world_size=1,
                                                equal_steps=False)]  # file path order ("-" < ".")
    assert gallery_ids == ["deep16", "shoes/s0-copy", "shoes/s0", "shoes/s1", "shoes/s2", "shoes/s3", "shoes/s4",
                           "shoes/s5"]
    queries = {s["id"]: s for s in _stream(tmp_path / "eval" / "queries", "query")}
    assert sorted(queries) == ["q1", "two"]
    assert (queries["q1"]["ref_id"], queries["q1"]["texts"], queries["q1"]["target_id"], queries["q1"]["gt_ids"],
            queries["q1"]["style"]) == ("shoes/s0", ["the same shoe"], "shoes/s0-copy", ["shoes/s0-copy"], "x")
    assert (queries["two"]["texts"], queries["two"]["target_id"], queries["two"]["gt_ids"]) == (
        ["darker, in leather"], "shoes/s2", ["shoes/s2", "deep16"])
    assert np.array_equal(np.asarray(queries["q1"]["ref"]), np.asarray(Image.open(gallery / "shoes" / "s0.png")))

    # ranked by a real task: the image-only baseline finds s0's pixel copy first once s0 itself is excluded
    from cirlab.train.baselines import BaselineTask
    from cirlab.train.commands import evaluate
    from cirlab.train.config import BackboneConfig

    q1_only = tmp_path / "q1.jsonl"
    q1_only.write_text(q.read_text().splitlines()[0] + "\n")
    assert cirlab(capsys, *_evalset_args(q1_only, gallery, tmp_path / "eval1", "--exclude-reference",
                                         "--metrics", "recall,map"))[0] == 0
    metrics = evaluate(BaselineTask("image", backbone=BackboneConfig("cirlab-tiny")), [str(tmp_path / "eval1")],
                       accelerator="cpu")["custom"]
    assert metrics["R@1"] == pytest.approx(100.0) and metrics["mAP@5"] == pytest.approx(100.0)


def test_an_evaluation_set_from_csv(tmp_path, gallery):
    from cirlab.data.custom_evalset import convert_eval_set

    q = tmp_path / "q.csv"
    q.write_bytes("\ufeffreference,texts,targets\nshoes/s0.png,red and bigger,shoes/s1|shoes/s2.png\n"
                  "shoes/s1.png,red|bigger,shoes/s2\n".encode())
    report = convert_eval_set(q, gallery, tmp_path / "eval")
    assert report.queries == 1 and report.protocol.recall_ks == [1, 5] and report.protocol.map_ks == []
    assert report.problems == [f"{q}:3: the query has 2 texts, but a plain query is read as one: join them into one text"]
    (s,) = _stream(tmp_path / "eval" / "queries", "query")
    assert (s["texts"], s["gt_ids"], s["id"]) == (["red and bigger"], ["shoes/s1", "shoes/s2"], "q2")


@pytest.mark.parametrize("setup,fragments", [
    ("no_queries", ["queries file", "does not exist", "--queries"]),
    ("no_gallery", ["gallery folder", "does not exist"]),
    ("empty_gallery", ["no readable images under"]),
    ("all_bad", ["no query written", "2 rows, none usable", "not in gallery: 2"]),
    ("metric", ["unknown --metrics 'ndcg'", "recall, map"]),
    ("strict", [":1: target 'shoes/zz' is not in the gallery"]),
    ("header", ["the CSV header names columns ['ref', 'text', 'target']", "missing 'reference'"]),
    ("same_id", ["would share the id 'shoes/s0'", "rename"]),
    ("reference_is_target", ["target 'shoes/s0' is the reference"]),
])
def test_evaluation_set_mistakes_are_one_error_and_write_nothing(tmp_path, gallery, capsys, setup, fragments):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"reference": "shoes/s0", "text": "x", "target": "shoes/zz"}) + "\n"
                 + json.dumps({"reference": "shoes/s0", "text": "x", "target": "shoes/zy"}) + "\n")
    g, more = gallery, []
    if setup == "no_queries":
        q = tmp_path / "missing.jsonl"
    elif setup == "no_gallery":
        g = tmp_path / "nowhere"
    elif setup == "empty_gallery":
        g = tmp_path / "empty"
        g.mkdir()
        (g / "zero.png").write_bytes(b"")
        fragments = fragments + ["zero.png"]
    elif setup == "metric":
        more = ["--metrics", "recall,ndcg"]
    elif setup == "strict":
        more = ["--strict"]
    elif setup == "header":
        q = tmp_path / "q.csv"
        q.write_text("ref,text,target\nshoes/s0,x,shoes/s1\n")
    elif setup == "same_id":
        Image.new("RGB", (8, 8)).save(gallery / "shoes" / "s0.jpg")
    elif setup == "reference_is_target":
        q.write_text(json.dumps({"reference": "shoes/s0", "text": "x", "target": "shoes/s0.png"}) + "\n")
        more = ["--exclude-reference", "--strict"]
    code, _, err = cirlab(capsys, *_evalset_args(q, g, tmp_path / "eval", *more))
    assert_one_error(code, err, "data", *fragments)
    assert not (tmp_path / "eval").exists()


def test_evalset_and_rows_options_do_not_mix(tmp_path, gallery, capsys):
    code, _, err = cirlab(capsys, "data", "convert", "--kind", "evalset", "--rows", "x.jsonl", "--out", str(tmp_path / "o"))
    assert_one_error(code, err, "data", "--queries FILE and --gallery DIR")
    code, _, err = cirlab(capsys, "data", "convert", "--kind", "pair", "--queries", "q.jsonl", "--out", str(tmp_path / "o"))
    assert_one_error(code, err, "data", "--rows FILE")
    # a missing option or an unknown one is one line too, not argparse's usage
    code, _, err = cirlab(capsys, "data", "convert", "--kind", "pair", "--rows", "x.jsonl")
    assert_one_error(code, err, "data", "required", "out")
    code, _, err = cirlab(capsys, "data", "convert", "--kind", "pear", "--out", str(tmp_path / "o"))
    assert_one_error(code, err, "data", "kind")


# --------------------------------------------------------------------------- texts longer than the context


def test_texts_longer_than_the_context_are_counted_and_warned_about_once(caplog):
    from cirlab.models import Backbone
    from cirlab.models.text_context import ContextMonitor

    tok = Backbone("cirlab-tiny").tokenizer
    monitor = ContextMonitor(tok.context_length, tok.encode, "query texts")
    long = " ".join(["word"] * 10_000)
    exact = " ".join(["word"] * (tok.context_length - 2))  # fills the context exactly: not cut
    with caplog.at_level(logging.WARNING, logger="cirlab.models.text_context"):
        assert monitor.check([long, "a red dog", exact]) == 1
        numbers = " ".join(str(i) for i in range(100))  # 100 words: at least 100 tokens, from 192 bytes
        assert monitor.check([long + " more", numbers]) == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "cirlab.models.text_context"]
    assert len(warnings) == 1 and "10000 words (10002 tokens)" in warnings[0] and "77-token" in warnings[0]
    assert monitor.summary() == ("3 of 5 query texts were longer than the 77-token context and were cut "
                                 "(the longest had 10003 tokens)")
    assert tok([exact])[0, -1].item() == tok.eot_token_id and tok([long])[0, -1].item() == tok.eot_token_id


def test_every_recipe_the_readme_names_exists():
    # the README once told users to copy recipes/combiner/custom.yaml, which never existed
    text = (REPO / "README.md").read_text()
    named = set(re.findall(r"recipes/[\w./-]+\.yaml", text))
    # shipped recipes by name: `cirlab recipes show NAME`, `cirlab fit -c NAME`
    named |= {f"recipes/{n}.yaml" for n in re.findall(r"cirlab (?:recipes show|fit -c) ([\w/-]+)(?:\s|$)", text)
              if "/" in n}
    assert "recipes/combiner/custom-stage1.yaml" in named and "recipes/combiner/custom-stage2.yaml" in named
    assert sorted(n for n in named if not (REPO / n).is_file()) == []


def test_a_missing_or_foreign_data_folder_and_a_wrong_kind_are_one_error(tmp_path, capsys):
    from cirlab.data.kinds import check_kind
    from cirlab.data.shards import read_index

    plain = tmp_path / "photos"
    plain.mkdir()
    for src, fragments in [(tmp_path / "nowhere", ["data folder", "nowhere", "does not exist"]),
                           (plain, ["no shard index at", "is not a shard folder"])]:
        code, _, err = cirlab(capsys, "data", "mask", "--src", str(src), "--out", str(tmp_path / "o"))
        assert_one_error(code, err, "data", *fragments)
        with pytest.raises(FileNotFoundError):  # still the type callers catch
            read_index(src)
    (plain / "index.json").write_text("{not json")
    with pytest.raises(CirlabError, match="is damaged"):
        read_index(plain)
    with pytest.raises(ValueError, match="unknown sample kind 'triplets'") as info:
        check_kind("triplets")
    assert isinstance(info.value, CirlabError) and "pair, image, text, triplet" in info.value.hint


def test_a_quickstart_recipe_in_an_empty_folder_is_one_error_naming_what_is_missing(tmp_path):
    """A new user's first `cirlab fit` before writing the world, or before the run a recipe starts
    from: one line naming the missing path. Before: the missing shards hid behind "the cosine
    schedule needs its length" (the step estimate swallowed the error), the missing checkpoint behind
    90 lines of jsonargparse's traceback (it wraps what a recipe's class raises while it is built)."""
    r = cirlab_process("fit", "-c", "quickstart/clip", cwd=tmp_path)  # a fresh process, as a user runs it
    text = assert_one_error(r.returncode, after_lightning(r.stderr, "fit"), "fit",
                            "no shard folder or tar file at demo_out/world/pairs", "cirlab data synthetic --out demo_out/world")
    assert "schedule" not in text and "Traceback" not in r.stderr
    r = cirlab_process("fit", "-c", "quickstart/combiner", cwd=tmp_path)
    assert_one_error(r.returncode, after_lightning(r.stderr, "fit"), "fit", "pretrained checkpoint file not found",
                     "demo_out/runs/combiner-stage1/version_0/export/backbone.safetensors")
    assert "Traceback" not in r.stderr


def test_only_the_users_mistake_behind_an_error_is_shortened():
    from cirlab.errors import user_error_in

    missing = FileNotFoundError("no file at x")
    try:
        try:
            raise missing
        except FileNotFoundError as inner:
            raise ValueError("Does not validate against any of the Union subtypes") from inner
    except ValueError as wrapped:
        assert user_error_in(wrapped) is missing
    try:  # an error raised while handling a missing file, not from it: a bug, kept whole
        try:
            raise FileNotFoundError("cache miss")
        except FileNotFoundError:
            raise KeyError("a bug")
    except KeyError as bug:
        assert user_error_in(bug) is None
    assert user_error_in(RuntimeError("a bug")) is None
    mistake = CirlabError("bad key", "fix it")
    assert user_error_in(RuntimeError("wrapped")) is None and user_error_in(mistake) is mistake


def test_evaluating_a_checkpoint_that_ranks_no_evaluation_set_is_one_error(small_world, tmp_path):
    """A CLIP pre-training checkpoint given to `cirlab evaluate` (its validation is image<->text recall):
    one line saying so and what to run instead, not Lightning's "No `test_step()` method defined"."""
    import lightning as L

    from cirlab.data.retrieval import RetrievalDataModule
    from cirlab.train.clip_task import CLIPTask
    from cirlab.train.config import BackboneConfig

    task = CLIPTask(backbone=BackboneConfig("cirlab-tiny"))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, datamodule=RetrievalDataModule(train=str(small_world.path("pairs")), kind="pair",
                                                     batch_size=8, steps_per_epoch=1, num_workers=0))
    trainer.save_checkpoint(tmp_path / "clip.ckpt")
    r = cirlab_process("evaluate", "--ckpt", str(tmp_path / "clip.ckpt"), "--sets", str(small_world.root / "eval" / "test"),
                       cwd=tmp_path)
    assert "Traceback" not in r.stderr
    assert_one_error(r.returncode, after_lightning(r.stderr, "evaluate"), "evaluate", "holds a CLIPTask, which does not rank evaluation sets",
                     "add --baseline sum", "cirlab validate -c RECIPE --ckpt_path CKPT")


def test_evaluate_says_what_it_needs_to_score_a_baseline(small_world, tmp_path, capsys):
    sets = ["--sets", str(small_world.root / "eval" / "test")]
    code, _, err = cirlab(capsys, "evaluate", *sets)
    assert_one_error(code, err, "evaluate", "nothing to evaluate: no --ckpt and no --model",
                     "--baseline sum --model ViT-B-32 --pretrained laion2b_s34b_b79k")
    code, _, err = cirlab(capsys, "evaluate", "--model", "cirlab-tiny", *sets)
    assert_one_error(code, err, "evaluate", "--model cirlab-tiny without a checkpoint", "add --baseline sum")
    code, _, err = cirlab(capsys, "evaluate", "--ckpt", str(tmp_path / "x.ckpt"), "--model", "cirlab-tiny", *sets)
    assert_one_error(code, err, "evaluate", "--ckpt brings its own backbone", "--baseline with --model")
    code, _, err = cirlab(capsys, "evaluate", "--baseline", "both", "--model", "cirlab-tiny", *sets)
    assert_one_error(code, err, "evaluate", "baseline", "`cirlab evaluate --help` lists the options")


def test_a_world_of_zero_scenes_is_one_error_naming_the_flag(tmp_path, capsys):
    code, _, err = cirlab(capsys, "data", "synthetic", "--out", str(tmp_path / "w"), "--scenes", "0", "--renders", "0")
    assert_one_error(code, err, "data", "--scenes 0, --renders 0: each must be at least 1", "--scenes 4000")
    assert not (tmp_path / "w").exists()


def test_pretrained_weights_that_cannot_be_fetched_are_one_error(small_world, tmp_path, monkeypatch):
    """Offline (a cluster's compute node, this machine): a pretrained tag is one line naming the way out
    (a local file), not a traceback; an unknown tag lists the known ones."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail at once, as without network, with no retries
    sets = ["--sets", str(small_world.root / "eval" / "test")]
    r = cirlab_process("evaluate", "--baseline", "sum", "--model", "RN50", "--pretrained", "openai", *sets,
                       cwd=tmp_path)
    assert_one_error(r.returncode, after_lightning(r.stderr, "evaluate"), "evaluate",
                     "could not fetch the weights of 'RN50' pretrained='openai'", "pretrained=<file>")
    r = cirlab_process("evaluate", "--baseline", "sum", "--model", "ViT-B-32", "--pretrained", "laion9000", *sets,
                       cwd=tmp_path)
    assert_one_error(r.returncode, after_lightning(r.stderr, "evaluate"), "evaluate",
                     "unknown pretrained tag 'laion9000'", "laion2b_s34b_b79k", "a local checkpoint file")
