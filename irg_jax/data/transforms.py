"""Image transforms: IRG's colour conversion and resize rule, pixel scaling, size buckets.

IRG's ``ImageTransform`` (spec §4.4, fixture README "Conventions" 1-2):

    s = max(min(max_size/long_edge, 1), min_size/short_edge)
    w, h = snap(round(W*s)), snap(round(H*s))          snap(v) = max(stride, round(v/stride)*stride)
    if w*h > max_pixels: s2 = max_pixels/(w*h); w, h = snap(round(w*s2)), snap(round(h*s2))
    if max(w, h) > max_size: s3 = max_size/max(w, h); w, h = snap(round(w*s3)), snap(round(h*s3))

``round`` is Python's round-half-to-even. The resize is PIL bicubic (antialiased) on the
uint8 RGB image; pixels go to [-1, 1] afterwards as ``(u8/255 - 0.5)/0.5`` in float32.

Static shapes: VAE images of a pack are zero-padded into one of a few configured
``(H, W)`` buckets. A VAE image larger than the largest bucket is resized (aspect kept,
snapped down to the stride) so that it fits; ``ImageTransform.bucket_limit`` does that.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024  # 1,806,336, IRG's ImageTransform default

# Exact float32 value of every uint8 level after ToTensor (/255) and Normalize(0.5, 0.5).
_UNIT_LUT = ((np.arange(256, dtype=np.float32) / np.float32(255)) - np.float32(0.5)) / np.float32(0.5)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_unit_range(u8: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1], bit-identical to torchvision ToTensor + Normalize(.5, .5)."""
    return _UNIT_LUT[u8]


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert to RGB as IRG's ``pil_img2rgb`` does; return the image and a note naming the
    conversion (None for plain RGB).

    - RGBA, or any image with a ``transparency`` entry (e.g. palette + tRNS): composited on white.
    - LA / PA: alpha dropped without compositing (PIL's convert, as the official code).
    - L, P, CMYK, YCbCr, 1: PIL's convert('RGB').
    - 16-bit and 32-bit integer greyscale (``I;16*``, ``I``): scaled to 8 bits (v/257 for
      values above 255). PIL's own convert would clip to 255 and make such images white;
      this is a deliberate improvement over the official code.
    """
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        a = np.asarray(img).astype(np.float64)
        if a.max(initial=0) > 255:
            a = a / 257.0
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), "RGB"), f"converted_{mode}_to_rgb"
    if mode == "RGBA" or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.split()[3])
        return white, f"converted_{mode}_alpha_on_white"
    if mode == "RGB":
        return img, None
    return img.convert("RGB"), f"converted_{mode}_to_rgb"


def _snap(value: float, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def irg_target_size(width: int, height: int, max_size: int, min_size: int, stride: int,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """IRG's ``MaxLongEdgeMinShortEdgeResize`` output size ``(w, h)`` (see module docstring)."""
    s = max(min(max_size / max(width, height), 1.0), min_size / min(width, height))
    w, h = _snap(round(width * s), stride), _snap(round(height * s), stride)
    if w * h > max_pixels:
        s2 = max_pixels / (w * h)
        w, h = _snap(round(w * s2), stride), _snap(round(h * s2), stride)
    if max(w, h) > max_size:
        s3 = max_size / max(w, h)
        w, h = _snap(round(w * s3), stride), _snap(round(h * s3), stride)
    return w, h


def fit_into(width: int, height: int, limit_hw: tuple[int, int], stride: int) -> tuple[int, int]:
    """Shrink ``(w, h)`` (aspect kept, snapped *down* to the stride) until it fits ``limit_hw``."""
    lh, lw = limit_hw
    if height <= lh and width <= lw:
        return width, height
    s = min(lh / height, lw / width)
    w = max(stride, math.floor(width * s / stride) * stride)
    h = max(stride, math.floor(height * s / stride) * stride)
    return min(w, lw), min(h, lh)


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """IRG's ImageTransform on a PIL RGB image -> uint8 ``[H, W, 3]`` (stride-aligned sizes)."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = DEFAULT_MAX_PIXELS
    bucket_limit: tuple[int, int] | None = None  # (H, W) of the largest VAE bucket, or None

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        w, h = irg_target_size(width, height, self.max_size, self.min_size, self.stride, self.max_pixels)
        if self.bucket_limit is not None:
            w, h = fit_into(w, h, self.bucket_limit, self.stride)
        return w, h

    def __call__(self, rgb: Image.Image) -> np.ndarray:
        w, h = self.output_size(*rgb.size)
        if (w, h) != rgb.size:
            rgb = rgb.resize((w, h), Image.BICUBIC)
        out = np.asarray(rgb, dtype=np.uint8)
        assert out.shape == (h, w, 3), (out.shape, (h, w))
        return out


def bucket_for(buckets: Sequence[tuple[int, int]], height: int, width: int) -> int:
    """Index of the smallest-area bucket with ``H >= height`` and ``W >= width``; -1 if none."""
    best, best_area = -1, None
    for i, (bh, bw) in enumerate(buckets):
        if bh >= height and bw >= width and (best_area is None or bh * bw < best_area):
            best, best_area = i, bh * bw
    return best


def patchify(x, p: int):
    """``[..., H, W, C]`` -> ``[..., (H/p)*(W/p), p*p*C]``: patch n = gy*(W/p)+gx (row-major over
    the patch grid), feature (py*p+px)*C+c. The one patch order of the project (ViT patches,
    latent tokens, the autoencoder's space-to-depth); numpy and jax arrays alike."""
    *lead, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"spatial size {h}x{w} is not divisible by patch size {p}")
    n = len(lead)
    x = x.reshape(*lead, h // p, p, w // p, p, c).transpose(*range(n), n, n + 2, n + 1, n + 3, n + 4)
    return x.reshape(*lead, (h // p) * (w // p), p * p * c)


def grid_position_ids(height: int, width: int, patch: int, max_per_side: int) -> np.ndarray:
    """``row * max_per_side + col`` over the ``(H/p, W/p)`` grid, row-major (BAGEL's extrapolate ids)."""
    rows, cols = height // patch, width // patch
    if rows > max_per_side or cols > max_per_side:
        raise ValueError(f"{height}x{width} image has a {rows}x{cols} grid; the table is {max_per_side} per side")
    return (np.arange(rows)[:, None] * max_per_side + np.arange(cols)[None, :]).reshape(-1).astype(np.int32)
