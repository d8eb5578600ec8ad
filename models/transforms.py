"""Image transforms: CLIP4Cir's target-pad and square-pad, plus open_clip's own train/eval pipelines."""

from __future__ import annotations

from typing import Callable, Sequence

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

    if kind == "clip":
        aug = {"scale": train_scale} if (train and train_scale is not None) else None
        oc = open_clip.image_transform(image_size, is_train=train, mean=mean, std=std,
                                       interpolation="bicubic", aug_cfg=aug)
        # open_clip converts the mode only after resizing; convert first so palette/alpha images resize as RGB
        return Compose([_to_rgb, *oc.transforms])

    pad = TargetPad(target_ratio) if kind == "targetpad" else SquarePad()
    if train and train_scale is not None:
        geometry = [RandomResizedCrop(image_size, scale=train_scale, interpolation=InterpolationMode.BICUBIC)]
    else:
        geometry = [Resize(image_size, interpolation=InterpolationMode.BICUBIC), CenterCrop(image_size)]
    return Compose([_to_rgb, pad, *geometry, ToTensor(), Normalize(mean=mean, std=std)])
