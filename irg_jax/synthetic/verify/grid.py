"""A PNG grid of IRG examples: prompt | think 1 | image 1 | reflection | image 2, one row each.

    python -m irg_jax.synthetic.verify.grid RESULTS_DIR --out grid.png [--rows 8]

Reads the per-prompt folders the verifier scores (``result.json``, ``turn1.png``,
``turn2.png``); the texts come from ``turn1.txt``/``turn2.txt`` or, failing that, from
``think1``/``think2`` in ``result.json``. If ``RESULTS_DIR/scores.json`` exists, every
image is captioned PASS or FAIL.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import textwrap
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from irg_jax.synthetic.verify.results import read_prompt, result_folders

_PAD = 6
_HEADERS = ("prompt", "think 1", "image 1", "reflection", "image 2")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _turn_text(folder: pathlib.Path, turn: int) -> str:
    path = folder / f"turn{turn}.txt"
    if path.exists():
        return path.read_text(encoding="utf-8")
    result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    return str(result.get(f"think{turn}", ""))


def _wrap(text: str, width: int) -> list[str]:
    lines = []
    for paragraph in text.split("\n"):
        lines.extend(textwrap.wrap(paragraph, width) or [""])
    return lines


def render_grid(folders: Sequence[pathlib.Path], out_png: str | pathlib.Path, *, image_px: int = 128,
                text_chars: int = 38, font_size: int = 11, verdicts: Mapping[str, Mapping] | None = None,
                root: pathlib.Path | None = None) -> pathlib.Path:
    """Draws one row per folder and saves the PNG. ``verdicts``: folder name → {"turn1": bool, ...}."""
    if not folders:
        raise ValueError("no result folders to draw")
    font = _font(font_size)
    line_h = font_size + 3
    text_w = int(text_chars * font_size * 0.52)
    widths = (text_w, text_w, image_px, text_w, image_px)
    rows = []
    for folder in folders:
        name = str(folder.relative_to(root)) if root else folder.name
        texts = {0: read_prompt(folder), 1: _turn_text(folder, 1), 3: _turn_text(folder, 2)}
        wrapped = {k: _wrap(v, text_chars) for k, v in texts.items()}
        height = max(image_px + line_h, max(len(w) for w in wrapped.values()) * line_h)
        rows.append((folder, name, wrapped, height))
    total_w = sum(widths) + _PAD * (len(widths) + 1)
    total_h = line_h + _PAD + sum(h + _PAD for *_, h in rows) + _PAD
    canvas = Image.new("RGB", (total_w, total_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    xs = [_PAD + sum(widths[:i]) + _PAD * i for i in range(len(widths))]
    for x, header in zip(xs, _HEADERS):
        draw.text((x, _PAD // 2), header, fill=(0, 0, 0), font=font)
    y = line_h + _PAD
    for folder, name, wrapped, height in rows:
        draw.line([(0, y - _PAD // 2), (total_w, y - _PAD // 2)], fill=(200, 200, 200))
        for col, lines in wrapped.items():
            for i, line in enumerate(lines):
                draw.text((xs[col], y + i * line_h), line, fill=(30, 30, 30), font=font)
        for col, turn in ((2, 1), (4, 2)):
            path = folder / f"turn{turn}.png"
            if not path.exists():
                continue
            with Image.open(path) as im:
                canvas.paste(im.convert("RGB").resize((image_px, image_px), Image.NEAREST), (xs[col], y))
            draw.rectangle([xs[col] - 1, y - 1, xs[col] + image_px, y + image_px], outline=(160, 160, 160))
            passed = (verdicts or {}).get(name, {}).get(f"turn{turn}")
            if passed is not None:
                draw.text((xs[col], y + image_px + 1), "PASS" if passed else "FAIL",
                          fill=(0, 140, 0) if passed else (200, 0, 0), font=font)
        y += height + _PAD
    out = pathlib.Path(out_png)
    canvas.save(out)
    return out


def verdicts_from_scores(scores: Mapping) -> dict[str, dict[str, bool]]:
    return {p["folder"]: {k: v["passed"] for k, v in p.items() if k.startswith("turn")} for p in scores["prompts"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Render a PNG grid of IRG result folders.")
    p.add_argument("results_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=8, help="first N folders (sorted)")
    p.add_argument("--image-px", type=int, default=128)
    args = p.parse_args(argv)
    root = pathlib.Path(args.results_dir)
    folders = result_folders(root)[: args.rows]
    scores_path = root / "scores.json"
    verdicts = verdicts_from_scores(json.loads(scores_path.read_text())) if scores_path.exists() else None
    out = render_grid(folders, args.out, image_px=args.image_px, verdicts=verdicts, root=root)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
