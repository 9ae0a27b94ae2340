"""The synthetic world's vocabulary and its scenes: flat shapes on a white background.

A scene is a list of :class:`SceneObject` (shape, colour, size, centre in pixels) drawn
with Pillow, without anti-aliasing, so every object pixel has exactly its palette
colour. The verifier (``irg_jax.synthetic.verify``) reads images back with the same palette.

Sizes are defined for a 32-pixel canvas and scale linearly with the canvas size
(``size`` in 16..64 is supported).
"""
from __future__ import annotations

import dataclasses
import io
from typing import Mapping, Sequence

from PIL import Image, ImageDraw

# Named colours, chosen far apart in RGB and from the white background.
PALETTE: Mapping[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
DEFAULT_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: Mapping[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}

# Object side length (bounding box) on a 32-pixel canvas.
SIZES_AT_32: Mapping[str, int] = {"small": 8, "large": 12}
REFERENCE_CANVAS = 32
MIN_CANVAS, MAX_CANVAS = 16, 64


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One flat shape. ``cx``/``cy`` is the pixel centre of its ``side``×``side`` box."""

    shape: str
    colour: str
    size: str  # "small" | "large"
    cx: int
    cy: int
    side: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Inclusive pixel box (x0, y0, x1, y1)."""
        x0 = self.cx - self.side // 2
        y0 = self.cy - self.side // 2
        return x0, y0, x0 + self.side - 1, y0 + self.side - 1

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> "SceneObject":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def check_canvas(size: int) -> None:
    if not MIN_CANVAS <= size <= MAX_CANVAS:
        raise ValueError(f"image size {size} is outside the supported range [{MIN_CANVAS}, {MAX_CANVAS}]")


def object_side(size_name: str, canvas: int) -> int:
    """Side length in pixels of a ``size_name`` object on a ``canvas``-pixel image."""
    return max(4, round(SIZES_AT_32[size_name] * canvas / REFERENCE_CANVAS))


def render_scene(objects: Sequence[SceneObject], canvas: int,
                 palette: Mapping[str, tuple[int, int, int]] = PALETTE) -> Image.Image:
    """Draws the objects, in order, on a white ``canvas``×``canvas`` RGB image."""
    check_canvas(canvas)
    image = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        try:
            fill = palette[obj.colour]
        except KeyError:
            raise ValueError(f"colour {obj.colour!r} is not in the palette {sorted(palette)}") from None
        x0, y0, x1, y1 = obj.box
        if obj.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif obj.shape == "triangle":  # apex up, base along the bottom edge of the box
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; known: {SHAPES}")
    return image


def png_bytes(image: Image.Image) -> bytes:
    """PNG file bytes (fast zlib level; the images are tiny)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
