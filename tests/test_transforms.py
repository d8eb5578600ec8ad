"""Geometry of CLIP4Cir's target-pad and square-pad, and the transform pipelines built on them."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from cirlab.models.transforms import SquarePad, TargetPad, build_transform
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

MEAN = torch.tensor(OPENAI_DATASET_MEAN)
STD = torch.tensor(OPENAI_DATASET_STD)


def _white(w, h, mode="RGB"):
    return Image.new(mode, (w, h), "white")


def _black_rows(img):
    """Indices of rows that are entirely black."""
    a = np.asarray(img.convert("RGB")).sum(axis=(1, 2))
    return np.nonzero(a == 0)[0]


def _black_cols(img):
    a = np.asarray(img.convert("RGB")).sum(axis=(0, 2))
    return np.nonzero(a == 0)[0]


# ----------------------------------------------------------------------------- TargetPad
def test_targetpad_wide_image_by_hand():
    # long 300, short 100: ratio 3 >= 1.25 -> short side target 300/1.25 = 240, int((240-100)/2) = 70 per side
    out = TargetPad(1.25)(_white(300, 100))
    assert out.size == (300, 240)
    assert list(_black_rows(out)) == list(range(70)) + list(range(170, 240))
    assert len(_black_cols(out)) == 0


def test_targetpad_tall_image_by_hand():
    out = TargetPad(1.25)(_white(100, 300))
    assert out.size == (240, 300)
    assert list(_black_cols(out)) == list(range(70)) + list(range(170, 240))


def test_targetpad_odd_sizes_truncate_like_clip4cir():
    # 301/1.25 = 240.8 -> int((240.8 - 100)/2) = int(70.4) = 70 per side -> 240 rows
    assert TargetPad(1.25)(_white(301, 100)).size == (301, 240)
    # 400/1.25 = 320, (320 - 101)/2 = 109.5 -> 109 per side -> 101 + 218 = 319 rows
    assert TargetPad(1.25)(_white(400, 101)).size == (400, 319)


@pytest.mark.parametrize("size", [(100, 100), (120, 100), (100, 124)])
def test_targetpad_below_ratio_untouched(size):
    img = _white(*size)
    out = TargetPad(1.25)(img)
    assert out is img


def test_targetpad_exact_ratio_pads_nothing():
    # ratio == 1.25 is not below the threshold, but the target short side equals the current one
    out = TargetPad(1.25)(_white(125, 100))
    assert out.size == (125, 100) and len(_black_rows(out)) == 0


def test_targetpad_other_ratio():
    # ratio 2: 300x100 -> short side target 150, int((150-100)/2) = 25 per side
    assert TargetPad(2.0)(_white(300, 100)).size == (300, 150)
    with pytest.raises(ValueError, match="ratio"):
        TargetPad(0.5)


# ----------------------------------------------------------------------------- SquarePad
def test_squarepad_wide_and_tall():
    out = SquarePad()(_white(300, 100))
    assert out.size == (300, 300)
    assert list(_black_rows(out)) == list(range(100)) + list(range(200, 300))
    out = SquarePad()(_white(100, 300))
    assert out.size == (300, 300)
    assert list(_black_cols(out)) == list(range(100)) + list(range(200, 300))


def test_squarepad_odd_difference_is_square():
    out = SquarePad()(_white(301, 100))  # 201 rows of padding: 100 on top, 101 below
    assert out.size == (301, 301)
    assert list(_black_rows(out)) == list(range(100)) + list(range(200, 301))


def test_squarepad_square_untouched():
    img = _white(64, 64)
    assert SquarePad()(img) is img


# ----------------------------------------------------------------------------- pipelines
@pytest.mark.parametrize("kind", ["clip", "targetpad", "squarepad"])
@pytest.mark.parametrize("train", [False, True])
def test_shapes_and_modes(kind, train):
    t = build_transform(32, kind, train=train)
    for mode in ("RGB", "L", "RGBA", "P", "CMYK"):
        x = t(_white(90, 50, "RGB").convert(mode))
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_normalisation_values():
    # a uniform grey image: every pixel becomes (v - mean) / std per channel
    v = 128
    x = build_transform(16, "clip")(Image.new("RGB", (40, 20), (v, v, v)))
    expected = (v / 255 - MEAN) / STD
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(1, 2)), torch.zeros(3), atol=1e-5, rtol=0)


def test_targetpad_pipeline_black_bands():
    # 300x100 white -> 300x240 with 70 black rows each side -> short side 240 -> 64: 80x64, centre crop 64x64.
    # black band height in the output: 70 * 64/240 = 18.7 rows
    x = build_transform(64, "targetpad")(_white(300, 100))
    black = (0 - MEAN) / STD
    white = (1 - MEAN) / STD
    torch.testing.assert_close(x[:, 0, :].mean(dim=1), black, atol=1e-4, rtol=0)
    torch.testing.assert_close(x[:, 63, :].mean(dim=1), black, atol=1e-4, rtol=0)
    torch.testing.assert_close(x[:, 32, :].mean(dim=1), white, atol=1e-3, rtol=0)
    # the clip transform has no bands: the centre crop is all white
    y = build_transform(64, "clip")(_white(300, 100))
    torch.testing.assert_close(y[:, 0, :].mean(dim=1), white, atol=1e-3, rtol=0)


def test_targetpad_train_equals_eval_unless_scale():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 200, 3), dtype=np.uint8))
    a = build_transform(32, "targetpad", train=True)(img)
    b = build_transform(32, "targetpad", train=False)(img)
    assert torch.equal(a, b)
    t = build_transform(32, "targetpad", train=True, train_scale=(0.5, 0.6))
    crops = [m for m in t.transforms if isinstance(m, RandomResizedCrop)]
    assert len(crops) == 1 and crops[0].scale == (0.5, 0.6)


def test_clip_train_uses_random_resized_crop_scale():
    t = build_transform(32, "clip", train=True, train_scale=(0.9, 1.0))
    crops = [m for m in t.transforms if isinstance(m, RandomResizedCrop)]
    assert len(crops) == 1 and crops[0].scale == (0.9, 1.0)
    assert not any(isinstance(m, RandomResizedCrop) for m in build_transform(32, "clip").transforms)


def test_bad_kind_and_scale():
    with pytest.raises(ValueError, match="unknown image transform kind 'pad'"):
        build_transform(32, "pad")
    with pytest.raises(ValueError, match="train_scale"):
        build_transform(32, "clip", train=True, train_scale=(0.9, 1.5))
