"""Verifier of the synthetic world: does an image satisfy its prompt?

    from irg_jax.synthetic.verify import verify_image
    verdict = verify_image("a red circle left of a blue square", pil_image)
    verdict.passed, [c.to_json() for c in verdict.constraints]

The prompt is parsed from its text alone (:func:`constraints.parse_prompt`), the image
is parsed into coloured shapes (:func:`scene_parser.parse_image`), and each constraint
is checked (:func:`constraints.check_constraints`). ``python -m irg_jax.synthetic.verify DIR``
scores a folder of generation results (see :mod:`irg_jax.synthetic.verify.results`).
"""
from __future__ import annotations

import dataclasses

from irg_jax.synthetic.prompts import PromptSpec
from irg_jax.synthetic.verify.constraints import ConstraintResult, check_constraints, parse_prompt
from irg_jax.synthetic.verify.scene_parser import DetectedObject, ParserConfig, parse_image, parse_rgb, to_rgb_array


@dataclasses.dataclass(frozen=True)
class Verdict:
    prompt: str
    category: str
    passed: bool
    constraints: tuple[ConstraintResult, ...]
    objects: tuple[DetectedObject, ...]

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "category": self.category, "passed": self.passed,
                "constraints": [c.to_json() for c in self.constraints],
                "objects": [o.to_json() for o in self.objects]}


def verify_image(prompt: str | PromptSpec, image, cfg: ParserConfig = ParserConfig(),
                 position_margin: float = 0.1) -> Verdict:
    """Checks ``image`` (PIL image or HxWx3 array) against ``prompt`` (text, or an already parsed spec)."""
    spec = prompt if isinstance(prompt, PromptSpec) else parse_prompt(prompt)
    rgb = to_rgb_array(image)
    objects = parse_rgb(rgb, cfg)
    results = check_constraints(spec, objects, image_width=rgb.shape[1], position_margin=position_margin)
    return Verdict(prompt=spec.text if isinstance(prompt, PromptSpec) else prompt, category=spec.category,
                   passed=all(r.passed for r in results), constraints=tuple(results), objects=tuple(objects))


__all__ = ["ConstraintResult", "DetectedObject", "ParserConfig", "Verdict", "check_constraints", "parse_image",
           "parse_prompt", "verify_image"]
