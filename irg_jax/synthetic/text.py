"""The synthetic world's texts: think-1 plans and four-section reflections, from templates.

Every text is whitespace-tokenisable: words and punctuation marks are separated by
spaces or newlines, so ``text.split()`` yields the tokens of the demo's word-level
tokenizer. :func:`corpus_words` lists every token these templates (and the world's
vocabulary) can emit.

A plan describes the scene group by group, e.g.
``<think> a large red circle at the left . a small blue square at the right . </think>``.
A reflection names the defect of the first image (or says that it is already correct),
then gives IRG's three headed sections; its final section repeats the plan.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from irg_jax.synthetic import scenes
from irg_jax.synthetic.prompts import NUMBER_WORDS, RELATIONS
from irg_jax.data.trajectories import (SECTION_FINAL_PROMPT, SECTION_GUIDANCE, SECTION_IMPROVEMENTS,  # noqa: F401
                                       SYSTEM_PROMPT_FULL, SYSTEM_PROMPT_SHORT, THINK_CLOSE, THINK_OPEN)

# The demo's system prompt: IRG's instruction in six words. Every training sample and every
# generation starts with it, so at the demo's scale (a 64-token image after a ~20-token plan)
# SYSTEM_PROMPT_SHORT's 33 words were a third of each initial sample's tokens.
SYSTEM_PROMPT_TINY = "think , draw , check , then redraw ."

# Where a single object sits (cells of a 3x3 grid, or a half of the canvas).
CELL_WORDS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                               "bottom left", "bottom", "bottom right")
# How the objects of one group of two or more are arranged.
ARRANGEMENTS: tuple[str, ...] = ("side by side", "one above the other", "in a row", "in a column",
                                 "in a grid")

TEMPLATES = {
    "single": "a {size} {colour} {shape} at the {where}",
    "multiple": "{number} {size} {colour} {plural} {arrangement}",
    "correct": "the previous image already matches the prompt .",
    "correct_improvement": "- no change is needed .",
    "correct_guidance": "1. keep every shape , colour and position .\n2. keep the colours flat and the edges sharp .",
    "colour": "the {shape} at the {where} is {actual} , but it should be {expected} .",
    "colour_improvement": "- the {shape} at the {where} must be {expected} , not {actual} .",
    "colour_guidance": "1. recolour the {actual} {shape} to {expected} .",
    "swap": "the colours are swapped : the {shape} is {actual} and the {other_shape} is {other_actual} .",
    "swap_improvement": "- the {shape} must be {expected} and the {other_shape} must be {other_expected} .",
    "swap_guidance": "1. recolour the {shape} to {expected} .\n2. recolour the {other_shape} to {other_expected} .",
    "shape": "the {colour} {shape} at the {where} is drawn as a {actual} .",
    "shape_in_group": "one of the {plural} is drawn as a {actual} .",
    "shape_improvement": "- the object at the {where} must be a {shape} , not a {actual} .",
    "shape_in_group_improvement": "- every object must be a {shape} .",
    "shape_guidance": "1. redraw the {colour} {actual} as a {shape} .",
    "missing": "the {colour} {shape} is missing .",
    "count": "the image shows {actual} {colour} {noun} , but the prompt asks for {expected} .",
    "count_improvement": "- the image must show exactly {expected} {colour} {noun} .",
    "missing_guidance": "1. add a {size} {colour} {shape} at the {where} .",
    "missing_in_group_guidance": "1. add the missing {colour} {shape} .",
    "extra_guidance": "1. remove the extra {colour} {shape} .",
    "position": "the {colour} {shape} is {actual} the {other_colour} {other_shape} , but it should be {expected} it .",
    "position_improvement": "- the {colour} {shape} must be {expected} the {other_colour} {other_shape} .",
    "position_guidance": "1. swap the places of the {colour} {shape} and the {other_colour} {other_shape} .",
    "keep_rest": "{step}. keep everything else unchanged .",
    "quality": "the image matches the prompt , but the shapes are blotchy and there are stray patches .",
    "quality_improvement": "- every shape must be one flat colour with sharp edges on a clean background .",
    "quality_guidance": "1. redraw every shape in one flat colour .\n2. remove the stray patches .",
    # Reflections on the model's own first images (irg_jax.synthetic.own_images), from the verifier's findings.
    "own_too_few": "the image shows too few {plural} .",
    "own_too_many": "the image shows too many {plural} .",
    "own_missing": "the {words} is missing .",
    "own_missing_group": "some {words} are missing .",
    "own_position": "the {first} is not {relation} the {second} .",
    "own_blotchy": "the shapes are blotchy and there are stray patches .",
    "own_mismatch": "the image does not match the prompt .",
    "own_improvement": "- draw exactly what the final prompt says , every shape in one flat colour with sharp edges .",
    "own_guidance": "1. redraw the image from the final prompt .\n2. remove the stray patches .",
}

def wrap_think(body: str) -> str:
    return f"{THINK_OPEN} {body} {THINK_CLOSE}"


def reflection(analysis: str, improvement: str, guidance: Sequence[str], final_prompt: str) -> str:
    """The four-section improvement think; ``guidance`` lines are numbered here."""
    steps = "\n".join(line if line[:1].isdigit() else f"{i}. {line}" for i, line in enumerate(guidance, 1))
    return (f"{THINK_OPEN} {analysis}\n\n{SECTION_IMPROVEMENTS}\n{improvement}\n\n"
            f"{SECTION_GUIDANCE}\n{steps}\n\n{SECTION_FINAL_PROMPT}\n{final_prompt} {THINK_CLOSE}")


def fill(name: str, **slots) -> str:
    return TEMPLATES[name].format(**slots)


def number_word(n: int) -> str:
    return NUMBER_WORDS[n]


def _template_words(template: str) -> list[str]:
    return re.sub(r"\{[^}]*\}", " ", template).split()


def corpus_words(colours: Iterable[str] = tuple(scenes.PALETTE), system_prompt: str = SYSTEM_PROMPT_SHORT
                 ) -> list[str]:
    """Every whitespace token the synthetic world can emit (sorted, unique)."""
    words: set[str] = set()
    for template in TEMPLATES.values():
        words.update(_template_words(template))
    for fixed in (THINK_OPEN, THINK_CLOSE, SECTION_IMPROVEMENTS, SECTION_GUIDANCE, SECTION_FINAL_PROMPT,
                  system_prompt, ".", "a", "an", "and"):
        words.update(fixed.split())
    words.update(colours)
    words.update(scenes.SHAPES)
    words.update(scenes.PLURALS.values())
    words.update(scenes.SIZES_AT_32)
    words.update(NUMBER_WORDS)
    for phrase in (*CELL_WORDS, *ARRANGEMENTS, *RELATIONS):
        words.update(phrase.split())
    words.update(f"{i}." for i in range(1, 4))
    return sorted(words)
