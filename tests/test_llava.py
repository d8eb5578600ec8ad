"""convert_llava on a hand-written LLaVA file with good and bad entries: triples, cuts and the report."""

import json

import pytest
from PIL import Image

from cirlab.data.convert import BadRowError
from cirlab.data.llava import convert_llava

from shard_reading import samples

LONG = " ".join(["word"] * 120)  # 120 BPE tokens: over the 75 the CLIP context leaves

FILE = """[
  {"id": "a1", "image": "coco/a.jpg",
   "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the bus?"},
                     {"from": "gpt", "value": "The bus is red."},
                     {"from": "human", "value": "How many wheels?"},
                     {"from": "gpt", "value": "%s"}]},
  {"id": "t2", "conversations": [{"from": "human", "value": "Tell me a joke"}, {"from": "gpt", "value": "No."}]},
  {"id": "m3", "image": "coco/missing.jpg",
   "conversations": [{"from": "human", "value": "<image>\\nWhat?"}, {"from": "gpt", "value": "A cat."}]},
  {"id": "b4", "image": "vg/b.png",
   "conversations": [{"from": "gpt", "value": "out of order"}, {"from": "human", "value": "<image>\\nQ"},
                     {"from": "human", "value": "Where is the dog?\\n<image>"}, {"from": "gpt", "value": "On the sofa."},
                     {"from": "human", "value": "dangling question"}]},
  "not an object"
]
""" % LONG


@pytest.fixture
def llava(tmp_path):
    (tmp_path / "img" / "coco").mkdir(parents=True)
    (tmp_path / "img" / "vg").mkdir()
    Image.new("RGB", (32, 24), "red").save(tmp_path / "img" / "coco" / "a.jpg")
    Image.new("RGB", (20, 20), "blue").save(tmp_path / "img" / "vg" / "b.png")
    path = tmp_path / "llava.json"
    path.write_text(FILE)
    return path, tmp_path / "img"


def test_good_and_bad_entries(llava, tmp_path):
    path, images = llava
    report = convert_llava(path, images, tmp_path / "out", maxcount=2)
    got = {s["id"]: s for s in samples(tmp_path / "out")}
    assert sorted(got) == ["a1-t0", "a1-t1", "b4-t1"]
    assert got["a1-t0"]["instruction"] == "What colour is the bus?" and got["a1-t0"]["answer"] == "The bus is red."
    assert got["b4-t1"]["instruction"] == "Where is the dog?" and got["b4-t1"]["answer"] == "On the sofa."
    assert got["a1-t0"]["jpg"].size == (32, 24) and got["b4-t1"]["image_path"] == "vg/b.png"
    # the long answer is cut to the words that fit in 75 tokens, and counted
    assert got["a1-t1"]["answer"] == " ".join(["word"] * 75) and report.answers_cut == 1
    assert (report.entries, report.written, report.skipped) == (5, 3, 5)
    assert report.skipped_by_reason == {"no image": 1, "missing image": 1, "bad turn": 2, "malformed entry": 1}
    where = [p.split(": ")[0] for p in report.problems]
    assert where == [f"{path}:7", f"{path}:8", f"{path}:10", f"{path}:10", f"{path}:14"]
    assert "entry 't2' has no 'image'" in report.problems[0]
    assert "turn 0" in report.problems[2] and "the last one has no answer" in report.problems[3]


def test_strict_raises_on_the_first_bad_entry(llava, tmp_path):
    path, images = llava
    with pytest.raises(BadRowError, match=r"llava.json:7: no image"):
        convert_llava(path, images, tmp_path / "out", strict=True)
    assert not (tmp_path / "out" / "index.json").exists()  # all or nothing


def test_not_an_array(tmp_path):
    (tmp_path / "x.json").write_text('{"id": 1}')
    (tmp_path / "img").mkdir()
    with pytest.raises(Exception, match="expected a JSON array"):
        convert_llava(tmp_path / "x.json", tmp_path / "img", tmp_path / "out")
