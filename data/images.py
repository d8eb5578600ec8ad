"""Decoding images the same way everywhere (conversion, shard streaming, retrieval, reports).

PIL's ``convert("RGB")`` clips high-bit-depth greyscale (mode ``I;16``, values 0-65535) to 0-255, so a
16-bit PNG turns almost white. Here such images are scaled to 8 bits first, by their top byte, which
is what PIL (and libpng's strip-16) already do for 16-bit RGB PNGs: both kinds end up alike.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from cirlab.models.pixels import (HIGH_BIT_DEPTH_MODES, ImageDecodeError, is_high_bit_depth,  # noqa: F401
                                  to_8bit, to_rgb)

def open_image(data: bytes | str | os.PathLike) -> Image.Image:
    """Encoded bytes or a file path -> a fully loaded PIL image in its own mode (ImageDecodeError if unreadable)."""
    try:
        raw = Path(data).read_bytes() if isinstance(data, (str, os.PathLike)) else data
        if not raw:
            raise ImageDecodeError("empty file (0 bytes)")
        img = Image.open(io.BytesIO(raw))
        img.load()
        return img
    except ImageDecodeError:
        raise
    except Exception as exn:  # PIL raises many types for broken data
        raise ImageDecodeError(f"{type(exn).__name__}: {exn}") from exn


def decode_rgb(data: bytes | str | os.PathLike) -> Image.Image:
    """Encoded bytes or a file path -> a loaded RGB image, 16-bit scaled (ImageDecodeError if unreadable)."""
    return to_rgb(open_image(data))


def image_for_shard(data: bytes) -> bytes | Image.Image:
    """What a shard stores for an image file: its own bytes if 8-bit JPEG/PNG, else a decoded image
    (16-bit scaled to 8 bits) to re-encode. Raises ImageDecodeError if the bytes are not an image."""
    img = open_image(data)
    if is_high_bit_depth(img):
        return to_rgb(img)
    return data if img.format in ("JPEG", "PNG") else img


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Every file under ``folder`` (recursively) whose extension is an image's, sorted by path."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
