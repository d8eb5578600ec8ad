"""Geometry of CLIP4Cir's target-pad and square-pad, and the transform pipelines built on them."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from cirlab.models.transforms import BatchedRandomResizedCrop, SquarePad, TargetPad, build_transform
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
    t = build_transform(32, "clip", train=True, train_scale=(0.8, 1.0))
    assert isinstance(t, BatchedRandomResizedCrop) and t.scale == (0.8, 1.0) and t.size == 32
    assert build_transform(32, "clip", train=True).scale == (0.9, 1.0)  # open_clip's default
    assert not any(isinstance(m, RandomResizedCrop) for m in build_transform(32, "clip").transforms)


def _smooth(w, h, seed=0):
    """A natural-looking image: coarse noise upsampled (no pixel-level overshoot at the edges)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.BILINEAR)


@pytest.mark.parametrize("w,h,size", [(64, 64, 64), (100, 80, 64), (300, 200, 48), (40, 50, 64)])
def test_batched_crop_equals_torchvision_resized_crop(w, h, size):
    """Each crop of the batched transform is torchvision's PIL resized_crop (bicubic, the train path of
    open_clip) of the same box, within one 8-bit level: upscaled and antialiased downscaled crops."""
    import random

    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    t = BatchedRandomResizedCrop(size, scale=(0.08, 1.0))
    img = _smooth(w, h)
    rng = random.Random(0)
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    items = [t.defer(pixels, rng) for _ in range(12)]
    got = t.finish(items)
    want = torch.stack([TF.normalize(TF.to_tensor(TF.resized_crop(img, *it.box, [size, size],
                                                                   InterpolationMode.BICUBIC)), MEAN, STD)
                        for it in items])
    levels = ((got - want) * STD.view(1, 3, 1, 1) * 255).abs()
    assert got.shape == (12, 3, size, size)
    assert levels.max() <= 1.01, levels.max()
    assert levels.mean() < 0.1


def test_batched_crop_boxes_follow_the_scale_and_ratio():
    import random

    t = BatchedRandomResizedCrop(64, scale=(0.5, 0.7), ratio=(0.8, 1.25))
    rng = random.Random(1)
    for _ in range(300):
        top, left, h, w = t.draw(120, 90, rng)
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 120
        # rounding w and h to pixels moves area and ratio a little
        assert 0.5 * 0.97 <= w * h / (120 * 90) <= 0.7 * 1.03
        assert 0.8 * 0.97 <= w / h <= 1.25 * 1.03
    # a strip no crop of the allowed ratios fits: the centre crop of the nearest ratio
    assert t.draw(200, 10, rng) == (0, (200 - 12) // 2, 10, 12)
    assert t.draw(10, 10, random.Random(0)) is not None


def test_batched_crop_on_one_image_draws_from_torch():
    t = build_transform(32, "clip", train=True, train_scale=(0.3, 0.5))
    img = _smooth(60, 40)
    torch.manual_seed(0)
    a = t(img)
    torch.manual_seed(0)
    b = t(img)
    c = t(img)
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_bad_kind_and_scale():
    with pytest.raises(ValueError, match="unknown image transform kind 'pad'"):
        build_transform(32, "pad")
    with pytest.raises(ValueError, match="train_scale"):
        build_transform(32, "clip", train=True, train_scale=(0.9, 1.5))


@pytest.mark.parametrize("kind", ["clip", "targetpad", "squarepad"])
def test_fixed_pipelines_batch_exactly(kind):
    """The evaluation pipelines (and CLIP4Cir's deterministic training ones) normalise images of the
    input size per batch, bit-identical to the PIL pipeline; other sizes go through the pipeline."""
    import random

    t = build_transform(32, kind, train=False)
    images = [_smooth(32, 32, seed=1), _smooth(32, 32, seed=2), _smooth(50, 32, seed=3), _smooth(40, 100, seed=4)]
    items = [t.defer(torch.from_numpy(np.array(im)).permute(2, 0, 1), random.Random(0)) for im in images]
    got = t.finish(items)
    want = torch.stack([t(im) for im in images])
    assert torch.equal(got, want)
    assert repr(t) == repr(t.pipeline) and "Normalize" in repr(t)  # the feature cache's key is the pipeline's
