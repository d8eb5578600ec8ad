"""Image transforms: CLIP4Cir's target-pad and square-pad, plus open_clip's own train/eval pipelines."""

from __future__ import annotations

import functools
import math
import random
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from cirlab.models.pixels import to_rgb
from torchvision.transforms import (CenterCrop, Compose, InterpolationMode, Normalize, RandomResizedCrop, Resize,
                                    ToTensor)
from torchvision.transforms import functional as TF

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

TRANSFORM_KINDS = ("clip", "targetpad", "squarepad")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, P, RGBA, CMYK, 16-bit, ...) to RGB before padding, so the pad colour is real
    black; high-bit-depth values are scaled to 8 bits, never clipped."""
    return to_rgb(image)


class TargetPad:
    """CLIP4Cir's target-pad: pad with black so that long/short becomes at most `ratio`.

    If long/short < ratio the image is returned as is; otherwise each side of the short dimension
    gets int((long / ratio - short) / 2) black pixels, so the short side becomes (about) long / ratio.
    """

    def __init__(self, ratio: float = 1.25) -> None:
        if ratio < 1.0:
            raise ValueError(f"TargetPad ratio must be >= 1 (long/short side), got {ratio}")
        self.ratio = float(ratio)

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        long, short = max(w, h), min(w, h)
        if long / short < self.ratio:
            return image
        target = long / self.ratio
        # only the short dimension is padded: the long side's term is negative and clamps to 0
        pad_w = max(int((target - w) / 2), 0)
        pad_h = max(int((target - h) / 2), 0)
        return TF.pad(image, [pad_w, pad_h, pad_w, pad_h], fill=0, padding_mode="constant")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio})"


class SquarePad:
    """Pad the short side with black, centred, to an exactly square image.

    CLIP4Cir pads int(diff/2) on both sides, which leaves odd differences one pixel short of square;
    here the extra pixel goes to the right/bottom so the result is always square.
    """

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        side = max(w, h)
        left, top = (side - w) // 2, (side - h) // 2
        right, bottom = side - w - left, side - h - top
        if not (left or top or right or bottom):
            return image
        return TF.pad(image, [left, top, right, bottom], fill=0, padding_mode="constant")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def build_transform(image_size: int, kind: str = "clip", train: bool = False,
                    mean: Sequence[float] = OPENAI_DATASET_MEAN, std: Sequence[float] = OPENAI_DATASET_STD,
                    train_scale: tuple[float, float] | None = None,
                    target_ratio: float = 1.25) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised tensor (3, S, S) for one of TRANSFORM_KINDS.

    clip: open_clip's eval transform (resize short side, centre crop) or, with train=True, its train
    transform (RandomResizedCrop with scale `train_scale`, default open_clip's (0.9, 1.0)).
    targetpad / squarepad: pad, resize the short side (bicubic), centre crop — identical for train and
    eval as in CLIP4Cir, unless `train_scale` is given (then RandomResizedCrop after the pad in training).
    """
    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"unknown image transform kind {kind!r}; choose one of {list(TRANSFORM_KINDS)}")
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != 2 or image_size[0] != image_size[1]:
            raise ValueError(f"build_transform needs a square image size, got {image_size}")
        image_size = int(image_size[0])
    if train_scale is not None:
        train_scale = tuple(float(s) for s in train_scale)
        if len(train_scale) != 2 or not 0 < train_scale[0] <= train_scale[1] <= 1:
            raise ValueError(f"train_scale must be (low, high) with 0 < low <= high <= 1, got {train_scale}")
    mean, std = tuple(mean), tuple(std)

    if kind == "clip" and train:
        # open_clip's train pipeline (crop scale default (0.9, 1.0)), its pixel work batched in the loader
        return BatchedRandomResizedCrop(image_size, scale=train_scale or (0.9, 1.0), mean=mean, std=std)
    if kind == "clip":
        oc = open_clip.image_transform(image_size, is_train=False, mean=mean, std=std, interpolation="bicubic")
        # open_clip converts the mode only after resizing; convert first so palette/alpha images resize as RGB
        return FixedSizeFastPath(Compose([_to_rgb, *oc.transforms]), image_size, mean, std)

    pad = TargetPad(target_ratio) if kind == "targetpad" else SquarePad()
    if train and train_scale is not None:
        geometry = [RandomResizedCrop(image_size, scale=train_scale, interpolation=InterpolationMode.BICUBIC)]
        return Compose([_to_rgb, pad, *geometry, ToTensor(), Normalize(mean=mean, std=std)])
    geometry = [Resize(image_size, interpolation=InterpolationMode.BICUBIC), CenterCrop(image_size)]
    return FixedSizeFastPath(Compose([_to_rgb, pad, *geometry, ToTensor(), Normalize(mean=mean, std=std)]),
                             image_size, mean, std)


def _normalise(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 or 0-255 float pixels (B, 3, H, W) -> to_tensor + normalize, in torchvision's order of operations."""
    return pixels.float().div_(255).sub_(mean).div_(std)


class FixedSizeFastPath:
    """A deterministic pipeline (pad, resize the short side, centre crop, to tensor, normalise) that a
    stream runs per batch for images of exactly size x size, whose geometry it leaves as they are
    (nothing to pad, torchvision returns an equal-size resize and crop unchanged): their pixels are
    only normalised, together, with the same operations as ToTensor + Normalize, so the tensors are
    bit-identical. Other images go through the pipeline one by one. Same repr as the pipeline (the
    feature cache's key)."""

    def __init__(self, pipeline: Compose, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.pipeline, self.size = pipeline, int(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def transforms(self) -> list:
        return self.pipeline.transforms

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.pipeline(image)

    def defer(self, pixels: torch.Tensor, rng: random.Random) -> "DeferredCrop | torch.Tensor":
        if tuple(pixels.shape[1:]) == (self.size, self.size):
            return DeferredCrop(pixels, None)
        return self.pipeline(Image.fromarray(pixels.permute(1, 2, 0).numpy()))

    def finish(self, items: Sequence["DeferredCrop | torch.Tensor"]) -> torch.Tensor:
        out = torch.empty(len(items), 3, self.size, self.size)
        rows = [i for i, it in enumerate(items) if isinstance(it, DeferredCrop)]
        if rows:
            out[rows] = _normalise(torch.stack([items[i].pixels for i in rows]), self.mean, self.std)
        for i, it in enumerate(items):
            if not isinstance(it, DeferredCrop):
                out[i] = it
        return out

    def __repr__(self) -> str:
        return repr(self.pipeline)


# --------------------------------------------------------------------------- batched train crop


def _bicubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5), support 2."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


@functools.lru_cache(maxsize=8192)
def resample_weights(start: int, length: int, in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) rows that resample the span [start, start + length) of an image axis to
    out_size pixels with PIL's bicubic filter, widened by the scale when it shrinks (antialiasing, as
    PIL's resize does); pixels outside the span weigh nothing, each row sums to 1. Cached: a batch of
    crops of one image size repeats few spans."""
    scale = length / out_size
    filterscale = max(scale, 1.0)
    centre = start + (torch.arange(out_size, dtype=torch.float64)[:, None] + 0.5) * scale
    pix = torch.arange(in_size, dtype=torch.float64)[None, :]
    w = _bicubic((pix + 0.5 - centre) / filterscale)
    w = w * ((pix >= start) & (pix < start + length))
    return (w / w.sum(-1, keepdim=True)).float()


class DeferredCrop:
    """One decoded image and its drawn crop box, waiting for its batch (BatchedRandomResizedCrop)."""

    __slots__ = ("pixels", "box")

    def __init__(self, pixels: torch.Tensor, box: tuple[int, int, int, int]) -> None:
        self.pixels, self.box = pixels, box


class BatchedRandomResizedCrop:
    """open_clip's training transform (RandomResizedCrop with bicubic resampling, RGB, to tensor,
    normalise) with its pixel work done for a whole batch at once.

    A stream (data/streaming.py) calls `defer` per sample in the loader (the decoded pixels and the
    crop box, drawn from the sample's own seeded generator) and `finish` on the batch: two matrix
    products per image, separable bicubic resampling with PIL's kernel, antialiased when the crop
    shrinks, rounded to 8 bits after each pass as PIL does (torchvision's PIL path within one 8-bit
    level on natural images; on pixel noise Pillow sometimes runs the vertical pass first, which
    moves a few clipped pixels). Why: on small images the per-image PIL and torchvision calls cost
    more than the arithmetic (0.07 s of a 128-image batch of 64-px images on 2 cores, 0.004 s here).
    Called on one PIL image it does both for that image, drawing from torch's default generator.
    """

    def __init__(self, size: int, scale: Sequence[float] = (0.9, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 mean: Sequence[float] = OPENAI_DATASET_MEAN, std: Sequence[float] = OPENAI_DATASET_STD) -> None:
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def draw(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a crop of random area (`scale` of the image's) and aspect ratio
        (log-uniform in `ratio`); after ten misses, the centre crop of the nearest allowed ratio."""
        area = width * height
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(lo, hi))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def defer(self, pixels: torch.Tensor, rng: random.Random) -> DeferredCrop:
        """(3, H, W) uint8 RGB pixels and their crop box, for `finish`."""
        return DeferredCrop(pixels, self.draw(pixels.shape[2], pixels.shape[1], rng))

    def finish(self, items: Sequence[DeferredCrop]) -> torch.Tensor:
        """(B, 3, size, size) normalised crops; the images of one shape are resampled together."""
        out = torch.empty(len(items), 3, self.size, self.size)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(tuple(item.pixels.shape), []).append(i)
        for (_, h, w), rows in groups.items():
            x = torch.stack([items[i].pixels for i in rows]).float()
            boxes = [items[i].box for i in rows]
            wy = torch.stack([resample_weights(top, ch, h, self.size) for top, _, ch, _ in boxes])
            wxt = torch.stack([resample_weights(left, cw, w, self.size).T for _, left, _, cw in boxes])
            # PIL's two passes, horizontal first, each rounded and clipped to 8 bits
            y = (x @ wxt[:, None]).round_().clamp_(0, 255)
            y = (wy[:, None] @ y).round_().clamp_(0, 255)
            out[rows] = _normalise(y, self.mean, self.std)
        return out

    def __call__(self, image: Image.Image) -> torch.Tensor:
        rng = random.Random(int(torch.randint(2 ** 62, (1,)).item()))
        pixels = torch.from_numpy(np.array(_to_rgb(image), dtype=np.uint8)).permute(2, 0, 1)
        return self.finish([self.defer(pixels, rng)])[0]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())})")
