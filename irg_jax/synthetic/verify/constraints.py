"""Prompt text → structured constraints → per-constraint pass/fail on a parsed image.

The parser reads the synthetic world's prompt grammar from the text alone:

    prompt := phrase [("and" | relation) phrase]
    phrase := ("a" | "an" | one..five | digit) [colour] shape-or-plural
    relation := ["to the"] "left of" | ["to the"] "right of" | "above" | "below"

and infers the GenEval category: a relation → position; one phrase with a number word →
counting, with a colour → colors, else single_object; two phrases → color_attr if a
colour is named, else two_object.

Constraints (GenEval-style; objects the prompt does not name are ignored):
  count     per named shape: the image holds exactly the prompt's number of that shape
  colour    per coloured phrase: at least that many objects of that shape have that colour
  position  the largest object matching phrase 0 lies on the named side of the one
            matching phrase 1, by more than ``position_margin`` of the image width
A prompt passes when all of its constraints pass.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from irg_jax.synthetic import scenes
from irg_jax.synthetic.prompts import NUMBER_WORDS, ObjectGroup, PromptSpec, RELATIONS
from irg_jax.synthetic.verify.scene_parser import DetectedObject

_SINGULAR = {**{s: s for s in scenes.SHAPES}, **{p: s for s, p in scenes.PLURALS.items()}}
_COUNTS = {w: i for i, w in enumerate(NUMBER_WORDS) if i > 0} | {str(i): i for i in range(1, 10)}


@dataclasses.dataclass(frozen=True)
class ConstraintResult:
    kind: str  # count | colour | position
    target: str
    expected: Any
    observed: Any
    passed: bool

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def parse_prompt(text: str, colours: Sequence[str] = tuple(scenes.PALETTE)) -> PromptSpec:
    """The structured constraints of a prompt; ValueError naming the prompt if it does not parse."""
    tokens = text.lower().replace(".", " ").replace(",", " ").split()
    pos = 0

    def fail(why: str):
        raise ValueError(f"cannot parse prompt {text!r}: {why}")

    def phrase() -> tuple[ObjectGroup, bool]:
        nonlocal pos
        if pos >= len(tokens):
            fail("expected an object phrase at the end")
        det = tokens[pos]
        if det in ("a", "an"):
            count, numbered = 1, False
        elif det in _COUNTS:
            count, numbered = _COUNTS[det], True
        else:
            fail(f"expected 'a', 'an' or a number, got {det!r}")
        pos += 1
        colour = None
        if pos < len(tokens) and tokens[pos] in colours:
            colour = tokens[pos]
            pos += 1
        if pos >= len(tokens) or tokens[pos] not in _SINGULAR:
            fail(f"expected a shape among {list(_SINGULAR)} at word {pos}")
        shape = _SINGULAR[tokens[pos]]
        pos += 1
        return ObjectGroup(shape, count, colour), numbered

    first, numbered = phrase()
    if pos == len(tokens):
        category = "counting" if numbered else ("colors" if first.colour else "single_object")
        return PromptSpec(category, (first,))
    relation = None
    if tokens[pos] == "and":
        pos += 1
    else:
        if tokens[pos:pos + 2] == ["to", "the"]:
            pos += 2
        for rel in RELATIONS:
            words = rel.split()
            if tokens[pos:pos + len(words)] == words:
                relation, pos = rel, pos + len(words)
                break
        else:
            fail(f"expected 'and' or a relation {list(RELATIONS)} at word {pos}")
    second, _ = phrase()
    if pos != len(tokens):
        fail(f"unexpected words {tokens[pos:]}")
    if relation is not None:
        return PromptSpec("position", (first, second), relation)
    category = "color_attr" if (first.colour or second.colour) else "two_object"
    return PromptSpec(category, (first, second))


def _matches(obj: DetectedObject, group: ObjectGroup) -> bool:
    return obj.shape == group.shape and (group.colour is None or obj.colour == group.colour)


def check_constraints(spec: PromptSpec, objects: Sequence[DetectedObject], image_width: int,
                      position_margin: float = 0.1) -> list[ConstraintResult]:
    results = []
    for shape in dict.fromkeys(g.shape for g in spec.groups):
        expected = sum(g.count for g in spec.groups if g.shape == shape)
        observed = sum(o.shape == shape for o in objects)
        results.append(ConstraintResult("count", scenes.PLURALS[shape] if expected != 1 else shape,
                                        expected, observed, observed == expected))
    for g in spec.groups:
        if g.colour is not None:
            observed = sum(_matches(o, g) for o in objects)
            results.append(ConstraintResult("colour", g.words(), g.count, observed, observed >= g.count))
    if spec.relation is not None:
        a_group, b_group = spec.groups
        target = f"{a_group.words()} {spec.relation} {b_group.words()}"
        a = next((o for o in objects if _matches(o, a_group)), None)  # objects are largest first
        b = next((o for o in objects if _matches(o, b_group) and o is not a), None)
        if a is None or b is None:
            results.append(ConstraintResult("position", target, spec.relation, "missing object", False))
        else:
            margin = position_margin * image_width
            dx, dy = a.cx - b.cx, a.cy - b.cy
            observed = [rel for rel, holds in (("left of", dx < -margin), ("right of", dx > margin),
                                               ("above", dy < -margin), ("below", dy > margin)) if holds]
            results.append(ConstraintResult("position", target, spec.relation, observed or ["overlapping"],
                                            spec.relation in observed))
    return results
