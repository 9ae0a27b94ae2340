"""Scores a folder of generation results and writes ``scores.json``.

Layout (as ``irg_jax.generate`` writes it): one folder per prompt, anywhere below the
results folder, holding ``result.json`` (with at least ``"prompt"``) and one image per
turn, ``turn1.png``, ``turn2.png``, ... A turn whose image is missing is skipped for that
prompt. For every turn the scores hold:

  overall          GenEval's score: the mean over categories of the per-category accuracy
  prompt_accuracy  share of all scored prompts that pass
  per_category     {category: {accuracy, n}}
  per_constraint   {count|colour|position: {accuracy, n}} over individual constraints

plus, for each later turn, how many prompts it fixed or broke relative to the turn
before, and the per-prompt verdicts (constraints and detected objects).
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Mapping, Sequence

from PIL import Image

from irg_jax.synthetic.verify import Verdict, verify_image
from irg_jax.synthetic.verify.constraints import parse_prompt
from irg_jax.synthetic.verify.scene_parser import ParserConfig

_TURN_IMAGE = re.compile(r"^turn(\d+)\.png$")


def result_folders(results_dir: str | pathlib.Path) -> list[pathlib.Path]:
    root = pathlib.Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {str(root)!r} does not exist")
    return sorted(p.parent for p in root.rglob("result.json"))


def read_prompt(folder: pathlib.Path) -> str:
    path = folder / "result.json"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read result ({e})") from None
    if not isinstance(result, Mapping) or not isinstance(result.get("prompt"), str):
        raise ValueError(f"{path}: no string 'prompt' field")
    return result["prompt"]


def turn_images(folder: pathlib.Path) -> dict[int, pathlib.Path]:
    found = {}
    for p in folder.iterdir():
        m = _TURN_IMAGE.match(p.name)
        if m:
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def summarize(verdicts: Sequence[Verdict]) -> dict:
    """Accuracy overall, per category and per constraint kind."""
    per_category: dict[str, list[bool]] = {}
    per_kind: dict[str, list[bool]] = {}
    for v in verdicts:
        per_category.setdefault(v.category, []).append(v.passed)
        for c in v.constraints:
            per_kind.setdefault(c.kind, []).append(c.passed)

    def acc(values: list[bool]) -> dict:
        return {"accuracy": sum(values) / len(values), "n": len(values)}

    categories = {c: acc(v) for c, v in sorted(per_category.items())}
    return {
        "overall": (sum(c["accuracy"] for c in categories.values()) / len(categories)) if categories else None,
        "prompt_accuracy": (sum(v.passed for v in verdicts) / len(verdicts)) if verdicts else None,
        "num_images": len(verdicts),
        "per_category": categories,
        "per_constraint": {k: acc(v) for k, v in sorted(per_kind.items())},
    }


def score_results(results_dir: str | pathlib.Path, cfg: ParserConfig = ParserConfig(),
                  position_margin: float = 0.1, out_file: str | pathlib.Path | None = None) -> dict:
    """Scores every prompt folder; writes and returns the scores (default ``<results_dir>/scores.json``)."""
    root = pathlib.Path(results_dir)
    folders = result_folders(root)
    if not folders:
        raise FileNotFoundError(f"no result.json below {str(root)!r}")
    by_turn: dict[int, list[Verdict]] = {}
    passed: dict[int, dict[str, bool]] = {}
    prompts = []
    for folder in folders:
        prompt = read_prompt(folder)
        try:
            spec = parse_prompt(prompt)
        except ValueError as e:
            raise ValueError(f"{folder / 'result.json'}: {e}") from None
        name = str(folder.relative_to(root))
        entry = {"folder": name, "prompt": prompt, "category": spec.category}
        for turn, path in turn_images(folder).items():
            try:
                with Image.open(path) as im:
                    verdict = verify_image(prompt, im.convert("RGB"), cfg, position_margin)
            except OSError as e:
                raise ValueError(f"{path}: cannot read image ({e})") from None
            by_turn.setdefault(turn, []).append(verdict)
            passed.setdefault(turn, {})[name] = verdict.passed
            entry[f"turn{turn}"] = {k: v for k, v in verdict.to_json().items() if k not in ("prompt", "category")}
        prompts.append(entry)
    turns = {f"turn{t}": summarize(v) for t, v in sorted(by_turn.items())}
    ordered = sorted(by_turn)
    for before, after in zip(ordered, ordered[1:]):
        both = passed[before].keys() & passed[after].keys()
        turns[f"turn{after}"][f"vs_turn{before}"] = {
            "prompts": len(both),
            "fixed": sum(not passed[before][k] and passed[after][k] for k in both),
            "broken": sum(passed[before][k] and not passed[after][k] for k in both),
        }
    scores = {"results_dir": str(root), "num_prompts": len(folders), "colours": list(cfg.colours),
              "position_margin": position_margin, "turns": turns, "prompts": prompts}
    out = pathlib.Path(out_file) if out_file else root / "scores.json"
    out.write_text(json.dumps(scores, indent=1))
    return scores


def format_table(scores: Mapping) -> str:
    """A small text table: one row per category (and overall), one column per turn."""
    turns = list(scores["turns"])
    categories = sorted({c for t in turns for c in scores["turns"][t]["per_category"]})
    lines = [f"{'category':<16}" + "".join(f"{t:>10}" for t in turns)]

    def fmt(x):
        return f"{x:>10.3f}" if x is not None else f"{'-':>10}"

    for c in categories:
        lines.append(f"{c:<16}" + "".join(fmt(scores["turns"][t]["per_category"].get(c, {}).get("accuracy"))
                                          for t in turns))
    lines.append(f"{'overall':<16}" + "".join(fmt(scores["turns"][t]["overall"]) for t in turns))
    lines.append(f"{'prompt acc.':<16}" + "".join(fmt(scores["turns"][t]["prompt_accuracy"]) for t in turns))
    return "\n".join(lines)
