"""Round trip of every sample kind: write_shards -> finite stream -> the same content."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cirlab.data.kinds import KINDS
from cirlab.data.shards import read_index, write_shards
from cirlab.data.streaming import StreamLoader, make_dataset


def _img(rng: np.random.Generator, size: int = 24) -> Image.Image:
    # smooth gradients + noise: realistic enough that JPEG stays close
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1)
    noise = rng.integers(0, 20, (size, size, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _samples(kind: str, n: int, rng: np.random.Generator) -> list[dict]:
    out = []
    for i in range(n):
        sid = f"{kind}.{i}.v2"  # ids with dots live in the json member
        s: dict = {
            "pair": lambda: {"id": sid, "image": _img(rng), "text": f"a photo number {i} é", "source": "web"},
            "image": lambda: {"id": sid, "image": _img(rng)},
            "text": lambda: {"id": sid, "text": f"caption {i}", "masked": f"caption [{i}]"},
            "triplet": lambda: {"id": sid, "ref": _img(rng), "tgt": _img(rng), "ref_id": f"r.{i}",
                                "tgt_id": f"t.{i}", "texts": [f"make it {i}", "and red"],
                                "text_format": "fashioniq", "dataset": "unit"},
            "instruction": lambda: {"id": sid, "image": _img(rng), "instruction": f"what colour {i}?",
                                    "answer": "red"},
            "query": lambda: {"id": sid, "ref": _img(rng), "ref_id": f"r.{i}", "texts": [f"q {i}"],
                              "target_id": f"t.{i}", "gt_ids": [f"t.{i}", f"u.{i}"], "subset": ["a", "b"]},
        }[kind]()
        out.append(s)
    return out


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(tmp_path, kind, image_format):
    rng = np.random.default_rng(hash(kind) % 1000)
    samples = _samples(kind, 7, rng)
    index = write_shards(samples, tmp_path / "s", kind, maxcount=3, image_format=image_format)
    assert index.counts == [3, 3, 1]
    assert read_index(tmp_path / "s").total == 7
    stream = make_dataset(tmp_path / "s", kind, resampled=False, shuffle_buffer=0)
    got = {s["id"]: s for s in StreamLoader(stream)}
    assert stream.error_count == 0
    assert sorted(got) == sorted(s["id"] for s in samples)
    for want in samples:
        have = got[want["id"]]
        assert set(have) == set(want)
        for name, value in want.items():
            if isinstance(value, Image.Image):
                a = np.asarray(value, dtype=np.int16)
                b = np.asarray(have[name], dtype=np.int16)
                assert a.shape == b.shape
                if image_format == "png":
                    assert np.array_equal(a, b), name
                else:
                    assert np.abs(a - b).mean() < 6.0, name  # JPEG q95 on smooth images
            else:
                assert have[name] == value, name


def test_transform_and_batches(tmp_path):
    rng = np.random.default_rng(0)
    write_shards(_samples("triplet", 10, rng), tmp_path / "t", "triplet", maxcount=4, image_format="png")

    def to_tensor(img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255

    stream = make_dataset(tmp_path / "t", "triplet", transform=to_tensor, resampled=False,
                          shuffle_buffer=0, batch_size=4)
    batches = list(StreamLoader(stream))
    assert [len(b["id"]) for b in batches] == [4, 4, 2]  # finite: last partial batch kept
    b = batches[0]
    assert b["ref"].shape == (4, 3, 24, 24) and b["tgt"].shape == (4, 3, 24, 24)
    assert isinstance(b["texts"], list) and b["texts"][0] == ["make it 0", "and red"]
    assert "__stream__" not in b


def test_progress_bar_on_a_terminal_only(tmp_path):
    import io

    from rich.console import Console

    texts = [{"text": f"caption {i}", "id": str(i)} for i in range(30)]
    screen = io.StringIO()
    write_shards(texts, tmp_path / "a", "text", maxcount=7, total=30,
                 console=Console(file=screen, force_terminal=True, width=100))
    assert "text -> " in screen.getvalue() and "30/30" in screen.getvalue()
    log = io.StringIO()
    index = write_shards(texts, tmp_path / "b", "text", maxcount=7, console=Console(file=log, force_terminal=False))
    assert log.getvalue() == "" and index.counts == [7, 7, 7, 7, 2]
