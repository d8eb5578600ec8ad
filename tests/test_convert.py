"""Rows file + image folder -> shards: every kind from JSONL and CSV, bad rows reported and counted."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirlab.data.convert import BadRowError, cli, convert
from cirlab.errors import CirlabError
from cirlab.data.streaming import StreamLoader, make_dataset


@pytest.fixture()
def images(tmp_path) -> Path:
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    arr = lambda: rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)  # noqa: E731
    Image.fromarray(arr()).save(root / "a.jpg", quality=90)
    Image.fromarray(arr()).save(root / "b.png")
    Image.fromarray(arr()).save(root / "sub" / "c.bmp")  # not JPEG/PNG: re-encoded
    (root / "broken.jpg").write_bytes(b"this is not an image")
    good = (root / "a.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return root


def _write_rows(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        cols = sorted({k for r in rows for k in r})
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, cols)
            w.writeheader()
            for r in rows:
                w.writerow({k: "|".join(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


ROWS = {
    "pair": [{"image": "a.jpg", "text": "a red cube"}, {"image": "b.png", "caption": "two balls", "id": "x.1"},
             {"image": "sub/c.bmp", "text": "c", "source": "web"}],
    "image": [{"image": "a.jpg"}, {"image": "sub/c.bmp"}, {"image": "a.jpg"}],
    "text": [{"text": "a dog on a sofa"}, {"text": "blue sky", "id": "t7", "masked": "[MASK] sky"}],
    "triplet": [{"reference": "a.jpg", "target": "b.png", "texts": ["is red", "has stripes"], "dataset": "mine"},
                {"reference": "b.png", "target": "sub/c.bmp", "text": "is smaller",
                 "reference_id": "ref.2", "target_id": "tgt.2"}],
    "instruction": [{"image": "a.jpg", "instruction": "what colour?", "answer": "red"},
                    {"image": "b.png", "instruction": "how many?", "answer": "two", "id": "q.9"}],
}
EXPECTED = {  # id -> fields the stream must give back
    "pair": {"a": {"text": "a red cube"}, "x.1": {"text": "two balls"}, "sub/c": {"text": "c", "source": "web"}},
    "image": {"a": {}, "sub/c": {}, "a#1": {}},
    "text": {"1": {"text": "a dog on a sofa"}, "t7": {"text": "blue sky", "masked": "[MASK] sky"}},
    "triplet": {"1": {"ref_id": "a", "tgt_id": "b", "texts": ["is red", "has stripes"], "dataset": "mine"},
                "2": {"ref_id": "ref.2", "tgt_id": "tgt.2", "texts": ["is smaller"]}},
    "instruction": {"a": {"instruction": "what colour?", "answer": "red"},
                    "q.9": {"instruction": "how many?", "answer": "two"}},
}


@pytest.mark.parametrize("ext", [".jsonl", ".csv"])
@pytest.mark.parametrize("kind", list(ROWS))
def test_convert_every_kind(tmp_path, images, kind, ext):
    rows = _write_rows(tmp_path / f"rows{ext}", ROWS[kind])
    report = convert(kind, rows, images, tmp_path / "out", maxcount=2)
    assert report.written == len(ROWS[kind]) and report.skipped == 0 and report.problems == []
    assert report.index.total == len(ROWS[kind])
    # CSV rows start on line 2 (header), JSONL on line 1: default text/triplet ids are row numbers
    expected = EXPECTED[kind]
    if ext == ".csv" and kind in ("text", "triplet"):
        expected = {(str(int(k) + 1) if k.isdigit() else k): v for k, v in expected.items()}
    got = {s["id"]: s for s in StreamLoader(make_dataset(tmp_path / "out", kind, resampled=False))}
    assert sorted(got) == sorted(expected)
    for sid, fields in expected.items():
        for k, v in fields.items():
            assert got[sid][k] == v, (sid, k)
    if kind in ("pair", "image", "instruction"):
        assert got["a"]["image"].size == (16, 12)


def test_original_bytes_kept_and_others_reencoded(tmp_path, images):
    rows = _write_rows(tmp_path / "rows.jsonl", ROWS["pair"])
    convert("pair", rows, images, tmp_path / "out")
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    assert members["0000000000.jpg"] == (images / "a.jpg").read_bytes()  # JPEG untouched
    assert members["0000000001.png"] == (images / "b.png").read_bytes()  # PNG untouched, named .png
    assert members["0000000002.jpg"][:3] == b"\xff\xd8\xff"  # BMP re-encoded as JPEG


def test_bad_rows_reported_with_line_and_counted(tmp_path, images, caplog):
    lines = [
        json.dumps({"image": "a.jpg", "text": "fine"}),                 # 1 ok
        '{"image": "b.png", "text": ',                                   # 2 malformed JSON
        json.dumps({"image": "b.png"}),                                  # 3 missing text
        "",                                                              # 4 blank: not a row
        json.dumps({"image": "nope.jpg", "text": "x"}),                  # 5 missing image
        json.dumps({"image": "broken.jpg", "text": "x"}),                # 6 undecodable image
        json.dumps({"image": "truncated.jpg", "text": "x"}),             # 7 truncated image
        json.dumps(["not", "an", "object"]),                             # 8 malformed row
        json.dumps({"image": "b.png", "text": "fine too"}),              # 9 ok
    ]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(lines) + "\n")
    report = convert("pair", rows, images, tmp_path / "out")
    assert report.written == 2 and report.skipped == 6 and report.index.total == 2
    assert report.skipped_by_reason == {"malformed row": 2, "missing field": 1, "missing image": 1, "bad image": 2}
    assert [p.split(": ")[0] for p in report.problems] == [f"{rows}:{n}" for n in (2, 3, 5, 6, 7, 8)]
    assert "nope.jpg" in report.problems[2] and "'text'" in report.problems[1]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "skipped 6 rows" in warnings[0] and f"{rows}:2" in warnings[0]  # one, not six
    assert "skipped 6 rows" in report.summary()

    with pytest.raises(BadRowError, match=f"^{rows}:2: malformed JSON"):
        convert("pair", rows, images, tmp_path / "strict", strict=True)


def test_bad_csv_rows(tmp_path, images):
    rows = tmp_path / "rows.csv"
    rows.write_text("reference,target,texts\n"
                    "a.jpg,b.png,is red|is bigger\n"     # line 2: ok, two texts
                    "a.jpg,,is red\n"                     # line 3: missing target
                    "a.jpg,b.png\n"                        # line 4: wrong column count
                    "a.jpg,gone.png,x\n")                 # line 5: missing image
    report = convert("triplet", rows, images, tmp_path / "out")
    assert report.written == 1 and report.skipped == 3
    assert [p.split(": ")[0] for p in report.problems] == [f"{rows}:{n}" for n in (3, 4, 5)]
    (s,) = list(StreamLoader(make_dataset(tmp_path / "out", "triplet", resampled=False)))
    assert s["texts"] == ["is red", "is bigger"] and s["ref_id"] == "a" and s["tgt_id"] == "b"


def test_cli(tmp_path, images, capsys):
    rows = _write_rows(tmp_path / "rows.jsonl", ROWS["triplet"] + [{"reference": "a.jpg", "target": "nope.png",
                                                                    "text": "x"}])
    args = ["--kind", "triplet", "--rows", str(rows), "--images", str(images), "--out", str(tmp_path / "o")]
    assert cli(args + ["--maxcount", "1"]) == 0
    out = capsys.readouterr().out
    assert "written" in out and "missing image" in out and f"{rows}:3" in out
    assert len(list((tmp_path / "o").glob("*.tar"))) == 2
    with pytest.raises(BadRowError, match=f"^{rows}:3: image file not found"):
        cli(args + ["--strict", "--out", str(tmp_path / "strict")])
    assert not (tmp_path / "strict").exists()  # nothing left behind
    with pytest.raises(CirlabError, match="evalset"):
        convert("query", rows, images, tmp_path / "q")
