"""Improving-mode data built from the model's own first images.

    python -m irg_jax.synthetic.own_images --world WORLD --checkpoint EXPORT --out DIR [--num N]

IRG's improving modes learn to reflect on, and redraw, the first images of a generator.
The synthetic world's image 1 is a clean render with one deliberate defect; a model
trained from scratch fails differently (blotchy shapes, stray patches, a wrong count).
This step lets the model draw image 1 itself: for the first ``N`` trajectories of WORLD
it prefills the record's prompt and think 1 (teacher forcing), samples image 1 with the
flow, checks it with the verifier against the prompt, and writes a reflection that names
what the verifier found (or says the image already matches). Image 2 stays the
correct render of the plan, and the reflection's final prompt repeats the plan.

DIR receives the six mode datasets of all WORLD's trajectories (the first ``N`` with the
model's image 1, the rest unchanged; see ``--keep_rest``), ``records.jsonl`` without
images, the world's vocabulary and held-out prompts, and ``world.json`` with an
``own_images`` summary (how many first images passed, which findings were written).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import pathlib
import shutil
import sys
import time
from typing import Sequence

from PIL import Image

from irg_jax.synthetic import scenes
from irg_jax.synthetic import text
from irg_jax.data.trajectories import (THINK_CLOSE, THINK_OPEN, ModeDatasetWriter, TrajectoryRecord,
                                       read_records_jsonl)
from irg_jax.synthetic.verify import ParserConfig, Verdict, parse_prompt, verify_image

COPIED_FILES = ("word_vocab.json", "vocab.json", "heldout_prompts.jsonl")


def plan_body(think1: str) -> str:
    """The plan inside ``<think> ... </think>``."""
    body = think1.strip()
    if body.startswith(THINK_OPEN):
        body = body[len(THINK_OPEN):]
    if body.endswith(THINK_CLOSE):
        body = body[:-len(THINK_CLOSE)]
    return body.strip()


def findings(verdict: Verdict) -> dict[str, str]:
    """Template name -> sentence for each thing the verifier found wrong (empty: the image passed)."""
    if verdict.passed:
        return {}
    spec = parse_prompt(verdict.prompt)
    sentences: dict[str, str] = {}
    for c in verdict.constraints:
        if c.passed:
            continue
        if c.kind == "count":
            shape = next(g.shape for g in spec.groups if c.target in (g.shape, scenes.PLURALS[g.shape]))
            name = "own_too_few" if c.observed < c.expected else "own_too_many"
            sentences.setdefault(name, text.fill(name, plural=scenes.PLURALS[shape]))
        elif c.kind == "colour":
            group = next(g for g in spec.groups if g.words() == c.target)
            name = "own_missing" if group.count == 1 else "own_missing_group"
            sentences.setdefault(name, text.fill(name, words=c.target))
        elif c.kind == "position":
            first, second = spec.groups
            sentences["own_position"] = text.fill("own_position", first=first.words(), relation=spec.relation,
                                                  second=second.words())
    planned = sum(g.count for g in spec.groups)
    if any(o.shape == "unknown" for o in verdict.objects) or len(verdict.objects) > planned:
        sentences["own_blotchy"] = text.fill("own_blotchy")
    return sentences or {"own_mismatch": text.fill("own_mismatch")}


def own_reflection(think1: str, found: dict[str, str]) -> str:
    """The four-section reflection on a model-drawn image 1 with :func:`findings` ``found``;
    its final prompt repeats the plan."""
    body = plan_body(think1)
    if not found:
        return text.reflection(text.fill("correct"), text.fill("correct_improvement"),
                               text.fill("correct_guidance").split("\n"), body)
    return text.reflection(" ".join(found.values()), text.fill("own_improvement"),
                           text.fill("own_guidance").split("\n"), body)


@dataclasses.dataclass
class Summary:
    drawn: int = 0
    passed: int = 0
    kept: int = 0  # trajectories copied unchanged
    findings: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def to_json(self) -> dict:
        return {"drawn": self.drawn, "passed": self.passed, "kept_unchanged": self.kept,
                "pass_rate": round(self.passed / max(self.drawn, 1), 4), "findings": dict(self.findings)}


def redraw_records(runner, records: Sequence[TrajectoryRecord], parser: ParserConfig, seed: int,
                   summary: Summary, keep_passed: bool = False) -> list[TrajectoryRecord]:
    """The records with image 1 drawn by ``runner`` (given think 1) and a reflection on it.

    ``keep_passed``: where the verifier passes image 1, image 2 becomes that image (the reflection
    says it already matches, so the refinement learns to keep it), not the clean render."""
    out = []
    batches = runner.run([r.prompt for r in records], seed, thinks=[r.think1 for r in records])
    start = 0
    for batch in batches:
        for record, result in zip(records[start:start + len(batch)], batch):
            image = result.turns[0].image
            verdict = verify_image(record.prompt, image, parser)
            found = findings(verdict)
            summary.drawn += 1
            summary.passed += verdict.passed
            summary.findings.update(list(found))
            keep = keep_passed and verdict.passed
            meta = {**record.metadata, "image1_source": "model", "image1_verdict": verdict.to_json(),
                    "image2_source": "image1" if keep else "render"}
            image1 = scenes.png_bytes(Image.fromarray(image))
            out.append(dataclasses.replace(record, image1=image1, image2=image1 if keep else record.image2,
                                           think2=own_reflection(record.think1, found), metadata=meta))
        start += len(batch)
    return out


def build(world: pathlib.Path, checkpoint: str, out: pathlib.Path, *, num: int, keep_rest: bool = True,
          keep_passed: bool = False, batch_size: int = 32, seed: int = 0, num_steps: int = 25,
          timestep_shift: float = 3.0) -> dict:
    from irg_jax.inference import runner as runner_lib
    from irg_jax.inference.irg_loop import InferenceConfig, TurnGuidance

    world_json = json.loads((world / "world.json").read_text())
    cfg = world_json["config"]
    records = list(read_records_jsonl(world / "records.jsonl"))
    if num < 0 or num > len(records):
        raise ValueError(f"--num {num}: {world / 'records.jsonl'} holds {len(records)} trajectories")
    drawn_part, rest = records[:num], records[num:]
    tokenizer = runner_lib.load_tokenizer_dir(world / "word_vocab.json")
    longest = lambda texts: max((len(tokenizer.encode(t)) for t in texts), default=1)  # noqa: E731
    config = InferenceConfig(
        image_size=(cfg["size"], cfg["size"]), num_steps=num_steps, timestep_shift=timestep_shift,
        max_think_tokens=longest([r.think1 for r in drawn_part]) + 1,
        max_prompt_tokens=longest([r.prompt for r in drawn_part]),
        turn1=TurnGuidance(1.0, 1.0, (0.0, 1.0), "global"), num_refinements=0, system_prompt=cfg["system_prompt"])
    runner = runner_lib.from_checkpoint(checkpoint, config, batch_size, world / "word_vocab.json")
    parser = ParserConfig(colours=tuple(cfg["colours"]))
    summary = Summary()
    t0 = time.perf_counter()
    redrawn = redraw_records(runner, drawn_part, parser, seed, summary, keep_passed) if drawn_part else []
    seconds = round(time.perf_counter() - t0, 1)

    out.mkdir(parents=True, exist_ok=True)
    written = redrawn + (rest if keep_rest else [])
    summary.kept = len(rest) if keep_rest else 0
    writer = ModeDatasetWriter(out, system_prompt=cfg["system_prompt"],
                               initial_image_source=cfg.get("initial_image_source", "image2"))
    with writer, (out / "records.jsonl").open("w", encoding="utf-8") as f:
        for record in written:
            writer.add(record)
            f.write(json.dumps(record.to_json(with_images=False), ensure_ascii=False) + "\n")
    for name in COPIED_FILES:
        if (world / name).exists():
            shutil.copyfile(world / name, out / name)
    report = {**summary.to_json(), "checkpoint": str(checkpoint), "source_world": str(world), "seed": seed,
              "num_steps": num_steps, "timestep_shift": timestep_shift, "keep_passed": keep_passed,
              "seconds": seconds, "rows_per_mode": dict(writer.counts)}
    (out / "world.json").write_text(json.dumps({**world_json, "own_images": report}, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m irg_jax.synthetic.own_images", description=__doc__.split("\n")[0])
    p.add_argument("--world", required=True, help="a synthetic world (irg_jax.synthetic.world --out)")
    p.add_argument("--checkpoint", required=True, help="export directory of the model that draws image 1")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, required=True, help="trajectories whose image 1 the model draws")
    p.add_argument("--keep_rest", type=int, default=1, help="1: write the other trajectories unchanged")
    p.add_argument("--keep_passed", type=int, default=0,
                   help="1: image 2 of a trajectory whose own image 1 passed the verifier is that image 1")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_steps", type=int, default=25)
    p.add_argument("--timestep_shift", type=float, default=3.0)
    args = p.parse_args(argv)
    report = build(pathlib.Path(args.world), args.checkpoint, pathlib.Path(args.out), num=args.num,
                   keep_rest=bool(args.keep_rest), keep_passed=bool(args.keep_passed),
                   batch_size=args.batch_size, seed=args.seed, num_steps=args.num_steps,
                   timestep_shift=args.timestep_shift)
    print(f"wrote {args.out}: {json.dumps(report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
