"""Prompts of the synthetic world: their structure, their text, and the space of all of them.

A prompt is a :class:`PromptSpec`: a GenEval-style category, one or two object groups
(shape, count, optional colour) and, for ``position``, a relation between the two
groups. Its text is templated and short:

| category       | template                              | example                            |
|----------------|---------------------------------------|------------------------------------|
| single_object  | a {shape}                             | a circle                           |
| two_object     | a {shape} and a {shape}               | a circle and a square              |
| counting       | {one..four} {shape or plural}         | three triangles                    |
| colors         | a {colour} {shape}                    | a red circle                       |
| position       | a {colour} {shape} {rel} a {colour} {shape} | a red circle left of a blue square |
| color_attr     | a {colour} {shape} and a {colour} {shape}   | a red circle and a blue square     |

Relations are "left of", "right of", "above", "below" (group 0 relative to group 1).
Unlike GenEval, position prompts name colours too, so that two objects of the same
shape can be told apart and the prompt space is large enough to hold some out.

``PromptSpec.key`` identifies prompts with the same meaning ("a circle left of a
square" and "a square right of a circle"); held-out prompts are disjoint by key.
The verifier parses prompt text back into a ``PromptSpec`` (``irg_jax.synthetic.verify``).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping, Sequence

from irg_jax.synthetic import scenes

CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: Mapping[str, str] = {"left of": "right of", "right of": "left of", "above": "below",
                                       "below": "above"}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
MAX_COUNT = 4


@dataclasses.dataclass(frozen=True)
class ObjectGroup:
    shape: str
    count: int = 1
    colour: str | None = None

    def words(self) -> str:
        """'red circle', 'circles', 'blue squares'."""
        noun = self.shape if self.count == 1 else scenes.PLURALS[self.shape]
        return f"{self.colour} {noun}" if self.colour else noun


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """The structured constraints of one prompt (what the verifier checks)."""

    category: str
    groups: tuple[ObjectGroup, ...]
    relation: str | None = None  # groups[0] <relation> groups[1]

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}; known: {CATEGORIES}")
        if self.relation is not None and (self.relation not in RELATIONS or len(self.groups) != 2):
            raise ValueError(f"bad relation {self.relation!r} for {len(self.groups)} groups")

    @property
    def text(self) -> str:
        if self.category == "counting":
            (g,) = self.groups
            return f"{NUMBER_WORDS[g.count]} {g.words()}"
        phrases = [_with_article(g.words()) for g in self.groups]
        joiner = f" {self.relation} " if self.relation else " and "
        return joiner.join(phrases)

    @property
    def key(self) -> tuple:
        """Meaning-level identity: order-free for 'and', canonical direction for relations."""
        groups, relation = self.groups, self.relation
        if relation in ("right of", "below"):
            groups, relation = groups[::-1], INVERSE_RELATION[relation]
        elif relation is None:
            groups = tuple(sorted(groups, key=lambda g: (g.shape, g.count, g.colour or "")))
        return (self.category, groups, relation)

    @property
    def num_objects(self) -> int:
        return sum(g.count for g in self.groups)

    def to_json(self) -> dict:
        return {"category": self.category, "groups": [dataclasses.asdict(g) for g in self.groups],
                "relation": self.relation}

    @classmethod
    def from_json(cls, d: Mapping) -> "PromptSpec":
        return cls(category=d["category"], groups=tuple(ObjectGroup(**g) for g in d["groups"]),
                   relation=d.get("relation"))


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def prompt_space(category: str, colours: Sequence[str] = scenes.DEFAULT_COLOURS,
                 shapes: Sequence[str] = scenes.SHAPES) -> list[PromptSpec]:
    """Every prompt of ``category`` the world can state, in a fixed order (distinct texts)."""
    if category == "single_object":
        return [PromptSpec(category, (ObjectGroup(s),)) for s in shapes]
    if category == "two_object":
        return [PromptSpec(category, (ObjectGroup(a), ObjectGroup(b)))
                for a, b in itertools.permutations(shapes, 2)]
    if category == "counting":
        return [PromptSpec(category, (ObjectGroup(s, n),)) for s in shapes for n in range(1, MAX_COUNT + 1)]
    if category == "colors":
        return [PromptSpec(category, (ObjectGroup(s, 1, c),)) for s in shapes for c in colours]
    if category == "color_attr":
        return [PromptSpec(category, (ObjectGroup(sa, 1, ca), ObjectGroup(sb, 1, cb)))
                for sa, sb in itertools.permutations(shapes, 2)
                for ca, cb in itertools.permutations(colours, 2)]
    if category == "position":
        objects = [ObjectGroup(s, 1, c) for s in shapes for c in colours]
        return [PromptSpec(category, (a, b), rel)
                for a, b in itertools.permutations(objects, 2) for rel in RELATIONS]
    raise ValueError(f"unknown category {category!r}; known: {CATEGORIES}")
