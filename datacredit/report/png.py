"""Tiny PNGs of example images (grayscale or RGB), written with ``zlib`` alone.

A thumbnail of an 8×8 digit is ~100 bytes; making it through matplotlib would cost a figure per image. The browser
scales thumbnails up with ``image-rendering: pixelated`` so every pixel stays sharp.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from ..errors import DataError

__all__ = ["encode_png", "image_png", "to_uint8"]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a ``(H, W)`` grayscale or ``(H, W, 3)`` RGB ``uint8`` array."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise DataError(f"encode_png needs uint8 (H, W) or (H, W, 3), got {pixels.dtype} {pixels.shape}")
    h, w = pixels.shape[:2]
    if h == 0 or w == 0:
        raise DataError(f"encode_png: empty image of shape {pixels.shape}")
    color = 0 if pixels.ndim == 2 else 2
    rows = pixels.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter byte 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(
        b"IEND", b"")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Pixels as ``uint8``: integers are taken as 0..255; reals in [0, 1] are scaled by 255; other reals are
    min-max scaled per image (a constant image becomes mid-gray). NaN becomes 0."""
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.integer) or image.dtype == np.bool_:
        return np.clip(image.astype(np.int64) * (255 if image.dtype == np.bool_ else 1), 0, 255).astype(np.uint8)
    x = np.nan_to_num(image.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if lo < 0.0 or hi > 1.0:
        x = (x - lo) / (hi - lo) if hi > lo else np.full_like(x, 0.5)
    return np.round(x * 255.0).astype(np.uint8)


def image_png(item: np.ndarray, shape: tuple[int, ...]) -> bytes:
    """PNG of one example reshaped to ``shape``: ``(H, W)``, ``(H, W, 3)`` or channels-first ``(1|3, H, W)``."""
    item = np.asarray(item)
    shape = tuple(int(s) for s in shape)
    if item.size != int(np.prod(shape)):
        raise DataError(f"an example of {item.size} values (shape {item.shape}) cannot be shown as an image of "
                        f"shape {shape}; pass image_shape")
    pixels = item.reshape(shape)
    if len(shape) == 3 and shape[0] in (1, 3) and shape[2] not in (1, 3):
        pixels = np.moveaxis(pixels, 0, -1)  # channels-first (C, H, W) -> (H, W, C)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise DataError(f"image_shape {shape} is neither (H, W), (H, W, 3) nor (C, H, W) with C in 1, 3")
    return encode_png(to_uint8(pixels))
