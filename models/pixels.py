"""Image pixels to 8-bit RGB, the same way everywhere (transforms, decoding, conversion, reports).

PIL's ``convert("RGB")`` clips high-bit-depth greyscale (mode ``I;16``, values 0-65535) to 0-255, so a
16-bit PNG turns almost white. Here such images are scaled to 8 bits first, by their top byte, which
is what PIL (and libpng's strip-16) already do for 16-bit RGB PNGs: both kinds end up alike.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# modes whose samples do not fit in 8 bits; everything else converts to RGB without loss of range
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageDecodeError(ValueError):
    """Bytes that are not a readable image, or one whose value range cannot be mapped to 8 bits."""


def is_high_bit_depth(img: Image.Image) -> bool:
    """True for images whose pixel values exceed 8 bits (16-bit greyscale, 32-bit integer, float)."""
    return img.mode in HIGH_BIT_DEPTH_MODES


def to_8bit(img: Image.Image) -> Image.Image:
    """A high-bit-depth greyscale image scaled to mode "L"; other images are returned as they are."""
    if not is_high_bit_depth(img):
        return img
    values = np.asarray(img)
    if img.mode.startswith("I;16"):
        return Image.fromarray((values.astype(np.uint16) >> 8).astype(np.uint8), "L")
    if img.mode == "I":
        # 32-bit integers: 16-bit PNGs open this way in some PIL versions; other files (TIFF) may hold 8-bit values
        top = int(values.max(initial=0))
        if int(values.min(initial=0)) < 0 or top > 65535:
            raise ImageDecodeError(f"32-bit integer image with values {int(values.min())}..{top}: "
                                   "save it as an 8-bit or 16-bit image")
        sixteen = img.format == "PNG" or top > 255
        return Image.fromarray((values >> 8 if sixteen else values).astype(np.uint8), "L")
    # "F": floats, either 0..1 or 0..255
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    if lo < 0 or hi > 255 or np.isnan(values).any():
        raise ImageDecodeError(f"floating-point image with values {lo:g}..{hi:g}: save it as an 8-bit or 16-bit image")
    scale = 255.0 if hi <= 1.0 else 1.0
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """A loaded PIL image of any mode -> RGB, scaling high-bit-depth values to 8 bits (never clipping)."""
    img = to_8bit(img)
    return img if img.mode == "RGB" else img.convert("RGB")
