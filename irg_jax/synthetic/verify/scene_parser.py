"""Reads a flat-shapes image back into objects: colour segmentation, components, shapes.

Pixels are assigned to a palette colour by projecting them on the segment from white
to that colour: ``p ≈ white + a·(colour − white)``. A pixel belongs to the colour whose
line it is closest to, if that residual is small and the coverage ``a`` is at least
one half. Blurred edges (mixtures with the white background) and darker or lighter
versions of a colour therefore keep their colour, while pixels of no palette colour
are ignored. Each colour's mask (holes filled) is split into 8-connected components;
components smaller than ``min_area_frac`` of the image are noise. A component's shape
comes from its box fill ratio, the share of its area in the top half of its box, and
how full the corners of its box are:

    square:   fill ≈ 1.0,  corners full
    circle:   fill ≈ 0.79, corners mostly empty
    triangle: fill ≈ 0.5, and top- or bottom-heavy (apex up: ~27% of the area in the top half;
              this survives blur, which rounds a small triangle's box fill up towards a circle's)
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from irg_jax.synthetic import scenes


@dataclasses.dataclass(frozen=True)
class ParserConfig:
    colours: tuple[str, ...] = scenes.DEFAULT_COLOURS
    palette: Mapping[str, tuple[int, int, int]] = dataclasses.field(default_factory=lambda: dict(scenes.PALETTE))
    min_coverage: float = 0.5  # a: share of the colour in a colour/white mixture
    max_residual: float = 60.0  # RGB distance from the white-to-colour line
    min_area_frac: float = 12 / 1024  # of the image area (12 pixels at 32x32)
    min_fill: float = 0.3  # below: not a compact shape ("unknown")
    max_aspect: float = 2.2  # box aspect ratio above which the blob is "unknown"


@dataclasses.dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str  # circle | square | triangle | unknown
    area: int
    cx: float  # centroid, pixels
    cy: float
    box: tuple[int, int, int, int]  # inclusive x0, y0, x1, y1
    fill: float
    top_share: float
    corner_fill: float

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("cx", "cy", "fill", "top_share", "corner_fill"):
            d[k] = round(d[k], 3)
        d["box"] = list(self.box)
        return d


def to_rgb_array(image) -> np.ndarray:
    """float32 HxWx3 in [0, 255] from a PIL image or an array (uint8, or float in [0, 1] / [-1, 1])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    arr = arr.astype(np.float32)
    if arr.min() < -1e-3:  # [-1, 1]
        arr = (arr + 1.0) / 2.0
    return np.clip(arr, 0.0, 1.0) * 255.0


def colour_labels(rgb: np.ndarray, cfg: ParserConfig) -> np.ndarray:
    """int32 HxW: index into ``cfg.colours``, or -1 for background / no palette colour."""
    white = np.asarray(scenes.BACKGROUND, np.float32)
    directions = np.stack([np.asarray(cfg.palette[c], np.float32) - white for c in cfg.colours])  # K x 3
    offset = rgb.reshape(-1, 3) - white  # N x 3
    coverage = offset @ directions.T / np.sum(directions**2, axis=1)  # N x K
    residual = np.linalg.norm(offset[:, None, :] - coverage[:, :, None] * directions[None], axis=-1)
    residual = np.where(coverage >= cfg.min_coverage, residual, np.inf)
    best = np.argmin(residual, axis=1)
    ok = residual[np.arange(len(best)), best] <= cfg.max_residual
    return np.where(ok, best, -1).astype(np.int32).reshape(rgb.shape[:2])


def shape_features(mask: np.ndarray) -> tuple[float, float, float]:
    """(fill, top_share, corner_fill) of a component cropped to its box."""
    h, w = mask.shape
    area = mask.sum()
    fill = area / (h * w)
    rows = mask.sum(axis=1).astype(np.float64)
    half = h / 2
    top = rows[: int(half)].sum() + (rows[int(half)] / 2 if h % 2 else 0.0)
    ch, cw = max(1, round(h / 4)), max(1, round(w / 4))
    corners = [mask[:ch, :cw], mask[:ch, w - cw:], mask[h - ch:, :cw], mask[h - ch:, w - cw:]]
    corner_fill = float(np.mean([c.mean() for c in corners]))
    return float(fill), float(top / area), corner_fill


def classify_shape(fill: float, top_share: float, corner_fill: float, aspect: float, cfg: ParserConfig) -> str:
    if fill < cfg.min_fill or aspect > cfg.max_aspect:
        return "unknown"
    if fill < 0.64 or abs(top_share - 0.5) > 0.1:  # half-empty box, or top/bottom-heavy
        return "triangle"
    if fill >= 0.9 or corner_fill >= 0.6:
        return "square"
    return "circle"


def parse_image(image, cfg: ParserConfig = ParserConfig()) -> list[DetectedObject]:
    """The objects of an image (see :func:`to_rgb_array` for accepted inputs), largest first."""
    return parse_rgb(to_rgb_array(image), cfg)


def parse_rgb(rgb: np.ndarray, cfg: ParserConfig = ParserConfig()) -> list[DetectedObject]:
    """The objects of a float HxWx3 image with values in [0, 255], largest first."""
    labels = colour_labels(rgb, cfg)
    min_area = max(2, round(cfg.min_area_frac * labels.size))
    objects = []
    for k, colour in enumerate(cfg.colours):
        mask = ndimage.binary_fill_holes(labels == k)
        components, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
        if n == 0:
            continue
        for idx, sl in enumerate(ndimage.find_objects(components), 1):
            comp = components[sl] == idx
            area = int(comp.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(comp)
            h, w = comp.shape
            fill, top_share, corner_fill = shape_features(comp)
            shape = classify_shape(fill, top_share, corner_fill, max(h, w) / min(h, w), cfg)
            objects.append(DetectedObject(
                colour=colour, shape=shape, area=area, cx=float(xs.mean() + sl[1].start),
                cy=float(ys.mean() + sl[0].start), box=(sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1),
                fill=fill, top_share=top_share, corner_fill=corner_fill))
    objects.sort(key=lambda o: -o.area)
    return objects


def describe(objects: Sequence[DetectedObject]) -> str:
    return ", ".join(f"{o.colour} {o.shape} at ({o.cx:.0f},{o.cy:.0f})" for o in objects) or "nothing"
