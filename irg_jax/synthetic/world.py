"""The synthetic, verifiable IRG world: scenes, trajectories and the six mode datasets.

    python -m irg_jax.synthetic.world --out DIR --num N --seed S [--size 32] [--heldout K]

Each trajectory: a templated prompt of a GenEval category; a think-1 plan that fixes
what the prompt leaves open (colours, sizes, places); image 1, which with probability
``defect_prob`` is deliberately wrong in one way (colour, count, shape or position;
recorded in the metadata), or, with probability ``quality_prob`` when it has no such
defect, the right scene drawn blotchy; a four-section reflection that names that defect (or says
the image already matches and only polishes it); and image 2, the correct rendering of
the plan. Everything is a pure function of (seed, index), so runs are deterministic.

DIR receives the six mode datasets (:mod:`irg_jax.data.trajectories`), ``records.jsonl``
(texts, metadata and base64 images of every trajectory), ``heldout_prompts.jsonl``
(prompts whose meaning never occurs in training, with their constraints),
``vocab.json`` (every word the world can emit) and ``world.json`` (the settings).

By default the initial modes learn the *correct* image after think 1 (so turn 1 is not
taught to be wrong); the improving modes see the possibly wrong image 1 as condition.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import random
import sys
import time
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from irg_jax.synthetic import scenes
from irg_jax.synthetic import text
from irg_jax.synthetic.prompts import CATEGORIES, INVERSE_RELATION, MAX_COUNT, PromptSpec, prompt_space
from irg_jax.data.tokenizer import WordTokenizer
from irg_jax.data.trajectories import DEFAULT_ROWS_PER_GROUP, ModeDatasetWriter, TrajectoryRecord

SYSTEM_PROMPTS = {"tiny": text.SYSTEM_PROMPT_TINY, "short": text.SYSTEM_PROMPT_SHORT, "full": text.SYSTEM_PROMPT_FULL}
DEFECT_TYPES: tuple[str, ...] = ("colour", "count", "shape", "position", "quality")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    size: int = 32
    colours: tuple[str, ...] = scenes.DEFAULT_COLOURS
    shapes: tuple[str, ...] = scenes.SHAPES
    categories: tuple[str, ...] = CATEGORIES  # sampled uniformly
    defect_prob: float = 0.5
    heldout_fraction: float = 0.25  # at most this share of a category's meanings is held out (at least 1)
    system_prompt: str = text.SYSTEM_PROMPT_SHORT
    initial_image_source: str = "image2"  # see ModeDatasetWriter
    jitter: float = 0.12  # largest random shift of an object from its cell's centre, as a share of the canvas
    # Share of the trajectories without a content defect whose image 1 is drawn badly (blotchy
    # shapes, stray patches, pixel noise; see :func:`blotchy`) and whose reflection asks for a clean
    # redraw: the fine-detail improvements IRG's second turn makes. 0 keeps every such image clean.
    quality_prob: float = 0.0

    def __post_init__(self):
        scenes.check_canvas(self.size)
        unknown = [c for c in self.colours if c not in scenes.PALETTE]
        if unknown or len(self.colours) < 2:
            raise ValueError(f"colours {list(self.colours)} must be >= 2 names from {list(scenes.PALETTE)}")
        if not set(self.shapes) <= set(scenes.SHAPES) or len(self.shapes) < 2:
            raise ValueError(f"shapes {list(self.shapes)} must be >= 2 of {scenes.SHAPES}")
        if not 0.0 <= self.jitter <= 0.25:
            raise ValueError(f"jitter must be in [0, 0.25] (a share of the canvas), got {self.jitter}")
        if not 0.0 <= self.quality_prob <= 1.0:
            raise ValueError(f"quality_prob must be in [0, 1], got {self.quality_prob}")
        if not 0.0 <= self.defect_prob <= 1.0:
            raise ValueError(f"defect_prob must be in [0, 1], got {self.defect_prob}")


@dataclasses.dataclass(frozen=True)
class PlannedGroup:
    """A prompt group with everything the plan fixes: colour, size and place."""

    shape: str
    count: int
    colour: str
    size: str
    place: str  # a CELL_WORDS entry (or "left"/"top"...) for one object; an ARRANGEMENTS entry otherwise

    def phrase(self) -> str:
        if self.count == 1:
            return text.fill("single", size=self.size, colour=self.colour, shape=self.shape, where=self.place)
        return text.fill("multiple", number=text.number_word(self.count), size=self.size, colour=self.colour,
                         plural=scenes.PLURALS[self.shape], arrangement=self.place)


@dataclasses.dataclass(frozen=True)
class Trajectory:
    index: int
    spec: PromptSpec
    plan: tuple[PlannedGroup, ...]
    objects: tuple[scenes.SceneObject, ...]  # correct scene (image 2)
    group_of: tuple[int, ...]  # plan group of each object
    objects1: tuple[scenes.SceneObject, ...]  # image 1
    defect: dict | None
    think1: str
    think2: str


def plan_text(plan: Sequence[PlannedGroup]) -> str:
    """The body of think 1 (and of the reflection's final prompt)."""
    return " . ".join(g.phrase() for g in plan) + " ."


# ----------------------------------------------------------------------------- layout


class _Layout:
    """Places boxes in cells with a guaranteed gap of 2*margin between neighbouring cells.

    A box sits at its cell's centre shifted by at most ``jitter * canvas`` pixels (0: always centred).
    """

    def __init__(self, canvas: int, rng: random.Random, jitter: float):
        self.canvas = canvas
        self.rng = rng
        self.margin = max(1, round(canvas / 32))
        self.max_jitter = round(jitter * canvas)

    def start(self, a: float, b: float, side: int, lone: bool = False) -> int:
        """A random box start in [a, b) keeping ``margin`` from the cell edges."""
        centred = round((a + b - side) / 2)
        lo = max(math.ceil(a + self.margin), centred - self.max_jitter)
        hi = min(math.floor(b - self.margin - side), centred + self.max_jitter)
        if lone:  # a lone object may use its cell's margin too
            spread = min(self.margin, self.max_jitter)
            lo, hi = min(lo, centred - spread), max(hi, centred + spread)
        lo, hi = max(lo, 0), min(hi, self.canvas - side)
        if lo > hi:
            lo = hi = min(max(centred, 0), self.canvas - side)
        return self.rng.randint(lo, hi)

    def obj(self, group: PlannedGroup, x0: int, y0: int, side: int) -> scenes.SceneObject:
        h = side // 2
        return scenes.SceneObject(group.shape, group.colour, group.size, x0 + h, y0 + h, side)


def _plan_and_place(spec: PromptSpec, cfg: WorldConfig, rng: random.Random
                    ) -> tuple[tuple[PlannedGroup, ...], list[scenes.SceneObject], list[int]]:
    S = cfg.size
    lay = _Layout(S, rng, cfg.jitter)
    sizes = tuple(scenes.SIZES_AT_32)
    objects: list[scenes.SceneObject] = []
    group_of: list[int] = []

    if len(spec.groups) == 2:  # two single objects, one per half
        if spec.relation is not None:
            horizontal = spec.relation in ("left of", "right of")
            first_is_0 = spec.relation in ("left of", "above")
        else:
            horizontal, first_is_0 = rng.random() < 0.5, rng.random() < 0.5
        slots = [0, 1] if first_is_0 else [1, 0]  # slot of each group
        words = ("left", "right") if horizontal else ("top", "bottom")
        plan = []
        for gi, g in enumerate(spec.groups):
            size = rng.choice(sizes)
            planned = PlannedGroup(g.shape, 1, g.colour or rng.choice(cfg.colours), size, words[slots[gi]])
            plan.append(planned)
            side = scenes.object_side(size, S)
            lo, hi = slots[gi] * S / 2, (slots[gi] + 1) * S / 2
            along, across = lay.start(lo, hi, side), lay.start(0, S, side)
            x0, y0 = (along, across) if horizontal else (across, along)
            objects.append(lay.obj(planned, x0, y0, side))
            group_of.append(gi)
        return tuple(plan), objects, group_of

    (g,) = spec.groups
    colour = g.colour or rng.choice(cfg.colours)
    n = g.count
    size = "small" if n == 3 else rng.choice(sizes)
    side = scenes.object_side(size, S)
    if n == 1:
        cell = rng.randrange(9)
        planned = PlannedGroup(g.shape, 1, colour, size, text.CELL_WORDS[cell])
        r, c = divmod(cell, 3)
        x0 = lay.start(c * S / 3, (c + 1) * S / 3, side, lone=True)
        y0 = lay.start(r * S / 3, (r + 1) * S / 3, side, lone=True)
        return (planned,), [lay.obj(planned, x0, y0, side)], [0]
    if n == 4:
        arrangement = "in a grid"
        cells = [(c * S / 2, r * S / 2, S / 2) for r in range(2) for c in range(2)]
        planned = PlannedGroup(g.shape, n, colour, size, arrangement)
        for cx0, cy0, w in cells:
            objects.append(lay.obj(planned, lay.start(cx0, cx0 + w, side), lay.start(cy0, cy0 + w, side), side))
        return (planned,), objects, [0] * n
    horizontal = rng.random() < 0.5
    arrangement = {(2, True): "side by side", (2, False): "one above the other",
                   (3, True): "in a row", (3, False): "in a column"}[(n, horizontal)]
    planned = PlannedGroup(g.shape, n, colour, size, arrangement)
    across = lay.start(0, S, side)  # shared by the row or column
    for k in range(n):
        along = lay.start(k * S / n, (k + 1) * S / n, side)
        x0, y0 = (along, across) if horizontal else (across, along)
        objects.append(lay.obj(planned, x0, y0, side))
    return (planned,), objects, [0] * n


def _free_spot(objects: Sequence[scenes.SceneObject], side: int, cfg: WorldConfig, rng: random.Random
               ) -> tuple[int, int] | None:
    """A box start at least 2*margin away from every object, or None."""
    gap = 2 * max(1, round(cfg.size / 32))
    for _ in range(200):
        x0, y0 = rng.randint(0, cfg.size - side), rng.randint(0, cfg.size - side)
        if all(x0 >= b[2] + 1 + gap or b[0] >= x0 + side + gap or y0 >= b[3] + 1 + gap or b[1] >= y0 + side + gap
               for b in (o.box for o in objects)):
            return x0, y0
    return None


# ----------------------------------------------------------------------------- defects


@dataclasses.dataclass(frozen=True)
class _Defect:
    """A wrong first image and the reflection texts that name what is wrong."""

    objects: list[scenes.SceneObject]  # drawn in image 1
    info: dict  # recorded in the metadata: type, detail, expected, actual, ...
    analysis: str
    improvement: str
    guidance: list[str]


def _colour_defect(spec, plan, objects, group_of, cfg, rng) -> _Defect | None:
    coloured = [i for i, gi in enumerate(group_of) if spec.groups[gi].colour]
    if not coloured:
        return None
    if spec.category == "color_attr" and objects[0].colour != objects[1].colour and rng.random() < 0.5:
        a, b = objects  # swapped attribution
        slots = dict(shape=a.shape, other_shape=b.shape, actual=b.colour, other_actual=a.colour,
                     expected=a.colour, other_expected=b.colour)
        return _Defect([dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour)],
                       {"type": "colour", "detail": "swap", "object": 0, "other": 1,
                        "expected": [a.colour, b.colour], "actual": [b.colour, a.colour]},
                       text.fill("swap", **slots), text.fill("swap_improvement", **slots),
                       text.fill("swap_guidance", **slots).split("\n"))
    i = rng.choice(coloured)
    o = objects[i]
    actual = rng.choice([c for c in cfg.colours if c != o.colour])
    slots = dict(shape=o.shape, where=plan[group_of[i]].place, actual=actual, expected=o.colour)
    return _Defect(_replaced(objects, i, colour=actual),
                   {"type": "colour", "detail": "recolour", "object": i, "expected": o.colour, "actual": actual},
                   text.fill("colour", **slots), text.fill("colour_improvement", **slots),
                   [text.fill("colour_guidance", **slots)])


def _shape_defect(spec, plan, objects, group_of, cfg, rng) -> _Defect:
    i = rng.randrange(len(objects))
    o, group = objects[i], plan[group_of[i]]
    actual = rng.choice([s for s in cfg.shapes if s != o.shape])
    slots = dict(shape=o.shape, colour=o.colour, actual=actual, plural=scenes.PLURALS[o.shape], where=group.place)
    alone = "" if group.count == 1 else "_in_group"
    return _Defect(_replaced(objects, i, shape=actual),
                   {"type": "shape", "detail": "reshape", "object": i, "expected": o.shape, "actual": actual},
                   text.fill(f"shape{alone}", **slots), text.fill(f"shape{alone}_improvement", **slots),
                   [text.fill("shape_guidance", **slots)])


def _position_defect(spec, plan, objects, group_of, cfg, rng) -> _Defect | None:
    """Mirrors the scene along the relation's axis, which inverts the relation and keeps the gaps."""
    if spec.relation is None:
        return None
    horizontal = spec.relation in ("left of", "right of")
    mirrored = []
    for o in objects:
        start = (o.cx if horizontal else o.cy) - o.side // 2
        centre = cfg.size - o.side - start + o.side // 2
        mirrored.append(dataclasses.replace(o, **{"cx" if horizontal else "cy": centre}))
    a, b = objects
    actual = INVERSE_RELATION[spec.relation]
    slots = dict(colour=a.colour, shape=a.shape, other_colour=b.colour, other_shape=b.shape,
                 expected=spec.relation, actual=actual)
    return _Defect(mirrored, {"type": "position", "detail": "mirrored", "expected": spec.relation, "actual": actual},
                   text.fill("position", **slots), text.fill("position_improvement", **slots),
                   [text.fill("position_guidance", **slots)])


def _count_defect(spec, plan, objects, group_of, cfg, rng) -> _Defect | None:
    """One object too few (if at least two were planned) or, for one group below MAX_COUNT, one too many."""
    can_miss = len(objects) >= 2
    extra = not can_miss or (len(plan) == 1 and plan[0].count < MAX_COUNT and rng.random() < 0.5)
    gi = rng.randrange(len(plan))
    group = plan[gi]
    objs = list(objects)
    if extra:
        side = scenes.object_side(group.size, cfg.size)
        spot = _free_spot(objs, side, cfg, rng)
        if spot is None and not can_miss:
            return None
        if spot is None:
            extra = False
        else:
            objs.append(_Layout(cfg.size, rng, cfg.jitter).obj(group, spot[0], spot[1], side))
    if not extra:
        del objs[rng.choice([i for i, g in enumerate(group_of) if g == gi])]
    actual = group.count + (1 if extra else -1)
    noun = lambda n: group.shape if n == 1 else scenes.PLURALS[group.shape]  # noqa: E731
    slots = dict(colour=group.colour, shape=group.shape, size=group.size, where=group.place,
                 actual=text.number_word(actual), expected=text.number_word(group.count))
    if not extra and group.count == 1:
        analysis, guidance = text.fill("missing", **slots), text.fill("missing_guidance", **slots)
    else:
        analysis = text.fill("count", **slots, noun=noun(actual))
        guidance = text.fill("extra_guidance" if extra else "missing_in_group_guidance", **slots)
    return _Defect(objs, {"type": "count", "detail": "extra" if extra else "missing", "group": gi,
                          "expected": group.count, "actual": actual},
                   analysis, text.fill("count_improvement", **slots, noun=noun(group.count)), [guidance])


def _quality_defect(objects: Sequence[scenes.SceneObject]) -> _Defect:
    """Image 1 shows the right scene, drawn badly (the objects are unchanged; :func:`blotchy` draws it)."""
    return _Defect(list(objects), {"type": "quality", "detail": "blotchy"}, text.fill("quality"),
                   text.fill("quality_improvement"), text.fill("quality_guidance").split("\n"))


def blotchy(image: np.ndarray, rng: random.Random, cell: int = 4) -> np.ndarray:
    """A badly drawn copy of a rendered scene (uint8 [S, S, 3]), on a grid of ``cell``-pixel cells:
    about half of each shape's cells fade toward the background (a fifth vanish), two to five
    stray cells of a shape's colour appear within three cells of it, and every pixel gets noise."""
    gen = np.random.default_rng(rng.getrandbits(63))
    out = image.astype(np.float32)
    white = np.asarray(scenes.BACKGROUND, np.float32)
    n = image.shape[0] // cell
    cells = out.reshape(n, cell, n, cell, 3)  # a view: edits go to ``out``
    inked_px = np.abs(image.astype(np.float32) - white).sum(-1).reshape(n, cell, n, cell) > 30
    ink = inked_px.any(axis=(1, 3))  # cells that touch a shape
    for r, c in zip(*np.nonzero(ink)):
        u = gen.random()
        if u < 0.2:
            cells[r, :, c] = white
        elif u < 0.5:
            cells[r, :, c] = 0.5 * cells[r, :, c] + 0.5 * white
    inked = list(zip(*np.nonzero(ink)))
    for _ in range(gen.integers(2, 6) if inked else 0):
        r0, c0 = inked[gen.integers(len(inked))]
        colour = image.reshape(n, cell, n, cell, 3)[r0, :, c0][inked_px[r0, :, c0]]
        r, c = np.clip([r0 + gen.integers(-3, 4), c0 + gen.integers(-3, 4)], 0, n - 1)
        if len(colour) and not ink[r, c]:
            cells[r, :, c] = colour[0].astype(np.float32)
    out += gen.normal(0.0, 12.0, out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _replaced(objects: Sequence[scenes.SceneObject], i: int, **changes) -> list[scenes.SceneObject]:
    out = list(objects)
    out[i] = dataclasses.replace(out[i], **changes)
    return out


_DEFECT_MAKERS = {"colour": _colour_defect, "count": _count_defect, "shape": _shape_defect,
                  "position": _position_defect}


def applicable_defects(spec: PromptSpec) -> list[str]:
    """Defect types that break a constraint of ``spec`` (colour needs a named colour, position a relation)."""
    kinds = ["count", "shape"]
    if any(g.colour for g in spec.groups):
        kinds.append("colour")
    if spec.relation is not None:
        kinds.append("position")
    return kinds


# ----------------------------------------------------------------------------- trajectories


class World:
    """Samples trajectories of one world configuration; held-out meanings never appear."""

    def __init__(self, cfg: WorldConfig, seed: int, hold_out: bool = True):
        self.cfg, self.seed = cfg, seed
        self.spaces = {c: prompt_space(c, cfg.colours, cfg.shapes) for c in cfg.categories}
        self.heldout_keys = self._choose_heldout_keys() if hold_out else {c: [] for c in cfg.categories}
        self.train_prompts = {}
        for c, space in self.spaces.items():
            held = set(self.heldout_keys[c])
            self.train_prompts[c] = [s for s in space if s.key not in held]

    def _choose_heldout_keys(self) -> dict[str, list[tuple]]:
        rng = random.Random(f"irg-synthetic/heldout/{self.seed}")
        chosen = {}
        for c, space in self.spaces.items():
            keys = list(dict.fromkeys(s.key for s in space))
            n = max(1, int(self.cfg.heldout_fraction * len(keys)))
            if n >= len(keys):
                raise ValueError(f"category {c} has only {len(keys)} prompt meanings; cannot hold out {n}")
            chosen[c] = rng.sample(keys, n)
        return chosen

    def heldout_prompts(self, k: int) -> list[dict]:
        """``k`` held-out prompts, categories in turn, cycling each category's held-out meanings."""
        rng = random.Random(f"irg-synthetic/heldout-lines/{self.seed}")
        by_key = {c: {} for c in self.spaces}
        for c, space in self.spaces.items():
            for s in space:
                by_key[c].setdefault(s.key, []).append(s)
        order = {c: rng.sample(keys, len(keys)) for c, keys in self.heldout_keys.items()}
        lines = []
        for i in range(k):
            c = self.cfg.categories[i % len(self.cfg.categories)]
            r = i // len(self.cfg.categories)
            spec = rng.choice(by_key[c][order[c][r % len(order[c])]])
            lines.append({"id": f"heldout-{i:05d}", "prompt": spec.text, "category": c,
                          "constraints": spec.to_json()})
        return lines

    def trajectory(self, index: int) -> Trajectory:
        cfg = self.cfg
        rng = random.Random(f"irg-synthetic/{self.seed}/{index}")
        category = rng.choice(cfg.categories)
        spec = rng.choice(self.train_prompts[category])
        plan, objects, group_of = _plan_and_place(spec, cfg, rng)
        body = plan_text(plan)
        think1 = text.wrap_think(body)
        defect = None
        if rng.random() < cfg.defect_prob:
            kinds = applicable_defects(spec)
            rng.shuffle(kinds)
            for kind in kinds:  # the first that applies to this scene
                defect = _DEFECT_MAKERS[kind](spec, plan, objects, group_of, cfg, rng)
                if defect is not None:
                    break
        if defect is None and cfg.quality_prob > 0 and rng.random() < cfg.quality_prob:
            defect = _quality_defect(objects)
        if defect is None:
            think2 = text.reflection(text.fill("correct"), text.fill("correct_improvement"),
                                     text.fill("correct_guidance").split("\n"), body)
            return Trajectory(index, spec, plan, tuple(objects), tuple(group_of), tuple(objects), None,
                              think1, think2)
        steps = [*defect.guidance, text.fill("keep_rest", step=len(defect.guidance) + 1)]
        think2 = text.reflection(defect.analysis, defect.improvement, steps, body)
        return Trajectory(index, spec, plan, tuple(objects), tuple(group_of), tuple(defect.objects), defect.info,
                          think1, think2)

    def record(self, traj: Trajectory) -> TrajectoryRecord:
        image2 = scenes.png_bytes(scenes.render_scene(traj.objects, self.cfg.size))
        image1 = image2
        if traj.defect is not None:
            drawn = scenes.render_scene(traj.objects1, self.cfg.size)
            if traj.defect["type"] == "quality":
                rng = random.Random(f"irg-synthetic/{self.seed}/{traj.index}/quality")
                drawn = Image.fromarray(blotchy(np.asarray(drawn), rng))
            image1 = scenes.png_bytes(drawn)
        metadata = {
            "index": traj.index, "category": traj.spec.category, "constraints": traj.spec.to_json(),
            "plan": [dataclasses.asdict(g) for g in traj.plan], "defect": traj.defect,
            "objects": [o.to_json() for o in traj.objects],
            "objects_image1": [o.to_json() for o in traj.objects1],
        }
        return TrajectoryRecord(id=f"{traj.index:07d}", prompt=traj.spec.text, think1=traj.think1, image1=image1,
                                think2=traj.think2, image2=image2, metadata=metadata)

    def records(self, num: int, start: int = 0) -> Iterator[TrajectoryRecord]:
        for index in range(start, start + num):
            yield self.record(self.trajectory(index))


def write_result_folders(records: Iterator[TrajectoryRecord] | Sequence[TrajectoryRecord],
                         out_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """Lays trajectories out as ``irg_jax.generate`` does: ``<out>/<id>/`` with ``result.json``,
    ``turn1.png``, ``turn1.txt``, ``turn2.png``, ``turn2.txt``. Scoring these folders measures the
    verifier on ground truth (turn 2 always correct, turn 1 wrong where a defect was drawn)."""
    folders = []
    for record in records:
        folder = pathlib.Path(out_dir) / record.id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "turn1.png").write_bytes(record.image1)
        (folder / "turn2.png").write_bytes(record.image2)
        (folder / "turn1.txt").write_text(record.think1, encoding="utf-8")
        (folder / "turn2.txt").write_text(record.think2, encoding="utf-8")
        result = {"prompt": record.prompt, "source": "irg_jax.synthetic.world ground truth",
                  "category": record.metadata.get("category"), "defect": record.metadata.get("defect")}
        (folder / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        folders.append(folder)
    return folders


def generate(out_dir: str | pathlib.Path, num: int, seed: int, cfg: WorldConfig = WorldConfig(), *,
             heldout: int = 120, rows_per_group: int = DEFAULT_ROWS_PER_GROUP,
             record_images: bool = True) -> dict:
    """Writes the whole world to ``out_dir``; returns a summary (also saved as world.json)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world = World(cfg, seed, hold_out=heldout > 0)
    defects = {k: 0 for k in DEFECT_TYPES}
    categories = {c: 0 for c in cfg.categories}
    writer = ModeDatasetWriter(out, system_prompt=cfg.system_prompt, rows_per_group=rows_per_group,
                               initial_image_source=cfg.initial_image_source)
    with writer, (out / "records.jsonl").open("w", encoding="utf-8") as records_file:
        for record in world.records(num):
            writer.add(record)
            records_file.write(json.dumps(record.to_json(with_images=record_images), ensure_ascii=False) + "\n")
            categories[record.metadata["category"]] += 1
            if record.metadata["defect"]:
                defects[record.metadata["defect"]["type"]] += 1
    with (out / "heldout_prompts.jsonl").open("w", encoding="utf-8") as f:
        for line in world.heldout_prompts(max(heldout, 0)):
            f.write(json.dumps(line) + "\n")
    words = text.corpus_words(cfg.colours, cfg.system_prompt)
    (out / "vocab.json").write_text(json.dumps({"tokenization": "whitespace (str.split)", "words": words}, indent=1))
    # The demo's word-level tokenizer (``load_tokenizer(out)`` finds it).
    WordTokenizer.from_corpus(words).save(str(out / "word_vocab.json"))
    summary = {
        "num": num, "seed": seed, "config": dataclasses.asdict(cfg), "heldout": heldout,
        "heldout_meanings": {c: len(k) for c, k in world.heldout_keys.items()},
        "rows_per_mode": dict(writer.counts), "categories": categories, "defects": defects,
        "vocab_size": len(words), "seconds": round(time.perf_counter() - t0, 3),
    }
    (out / "world.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Generate the synthetic IRG world (six mode datasets + held-out prompts).")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, required=True, help="number of trajectories")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32, help=f"image side in pixels ({scenes.MIN_CANVAS}..{scenes.MAX_CANVAS})")
    p.add_argument("--heldout", type=int, default=120, help="number of held-out prompt lines (0: none held out)")
    p.add_argument("--defect-prob", type=float, default=0.5)
    p.add_argument("--quality-prob", type=float, default=0.0,
                   help="share of defect-free trajectories whose image 1 is drawn blotchy (fixed by turn 2)")
    p.add_argument("--jitter", type=float, default=WorldConfig.jitter,
                   help="largest shift of an object from its cell's centre, as a share of the canvas")
    p.add_argument("--colours", default=",".join(scenes.DEFAULT_COLOURS),
                   help=f"comma-separated, from {','.join(scenes.PALETTE)}")
    p.add_argument("--system-prompt", choices=tuple(SYSTEM_PROMPTS), default="short")
    p.add_argument("--initial-image", choices=("image1", "image2"), default="image2",
                   help="image the initial modes learn after think 1 (image2 = the correct one)")
    p.add_argument("--rows-per-group", type=int, default=DEFAULT_ROWS_PER_GROUP)
    p.add_argument("--no-record-images", action="store_true", help="leave base64 images out of records.jsonl")
    args = p.parse_args(argv)
    cfg = WorldConfig(size=args.size, colours=tuple(c.strip() for c in args.colours.split(",") if c.strip()),
                      defect_prob=args.defect_prob, jitter=args.jitter, quality_prob=args.quality_prob,
                      initial_image_source=args.initial_image,
                      system_prompt=SYSTEM_PROMPTS[args.system_prompt])
    summary = generate(args.out, args.num, args.seed, cfg, heldout=args.heldout,
                       rows_per_group=args.rows_per_group, record_images=not args.no_record_images)
    print(json.dumps({k: summary[k] for k in ("num", "seconds", "rows_per_mode", "defects", "heldout_meanings",
                                              "vocab_size")}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
