"""Turn 2 with the verifier's findings given as the reflection (teacher-forced), for the demo report.

    python -m irg_jax.synthetic.given_reflection --checkpoint EXPORT --samples SAMPLES --world WORLD/world.json \\
        --out OUT [the sampling flags of irg_jax.generate]

SAMPLES is a verified ``irg_jax.generate`` output (``scores.json`` written by ``irg_jax.synthetic.verify``).
For every run in it, this re-runs turn 2 of the same IRG loop with one change: the reflection
is not sampled but prefilled, and it is the one the verifier's findings on image 1 give
(:func:`irg_jax.synthetic.own_images.own_reflection`, the text stage 2 trained on). Everything
else is the run's own: its prompt, its think 1 (prefilled as given), its image 1 (read back
from ``turn1.png``: the loop feeds back that uint8 picture), and its row key and seed, so the
fed-back VAE noise and turn 2's starting noise are those of the run. Use the same sampling
flags as the run (the demo passes the same ones).

OUT/<run>/ gets ``turn1.png``/``turn1.txt`` (copies), ``turn2.png`` and ``turn2.txt`` (the
given reflection) and ``result.json``; score it with ``python -m irg_jax.synthetic.verify OUT``. Runs
on the default device, one batch of ``--batch_size`` runs per call.
"""
from __future__ import annotations

import json
import pathlib
import re
import shutil
import sys

import numpy as np


def canonical_think(text: str) -> str:
    """A decoded think (``< think> a red circle at the top.</ think>``: the export tokenizer's
    detokenised spacing) in the training data's form (``<think> a red circle at the top . </think>``),
    so that it encodes to the tokens the model sampled and its plan can be repeated in a reflection."""
    from irg_jax.data.trajectories import THINK_CLOSE, THINK_OPEN
    body = re.sub(r"<\s*/?\s*think\s*>", " ", text)
    return " ".join([THINK_OPEN, *re.findall(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]", body), THINK_CLOSE])


def verifier_reflections(samples: pathlib.Path, scores: dict, colours) -> list[dict]:
    """One entry per verified run: folder, prompt, row id, think 1, and the reflection that the
    verifier's findings on image 1 give (re-verified from ``turn1.png``, as own_images does)."""
    from PIL import Image

    from irg_jax.synthetic.own_images import findings, own_reflection
    from irg_jax.synthetic.verify import ParserConfig, verify_image
    parser = ParserConfig(colours=tuple(colours))
    out = []
    for run in scores["prompts"]:
        folder = samples / run["folder"]
        result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        think1 = canonical_think((folder / "turn1.txt").read_text(encoding="utf-8"))
        image1 = np.asarray(Image.open(folder / "turn1.png").convert("RGB"))
        verdict = verify_image(result["prompt"], image1, parser)
        if verdict.passed != run["turn1"]["passed"]:
            raise ValueError(f"{folder}: turn1.png verifies as passed={verdict.passed}, scores.json says "
                             f"{run['turn1']['passed']} (scored with other colours?)")
        out.append({"folder": run["folder"], "prompt": result["prompt"], "row_id": int(result["index"]),
                    "think1": think1, "image1": image1, "passed1": verdict.passed,
                    "reflection": own_reflection(think1, findings(verdict))})
    return out


def make_program(runner):
    """A jitted turn 2 from (given think 1, given image 1, given reflection) for ``runner``'s model."""
    import jax
    from flax import nnx

    from irg_jax.inference import irg_loop

    prog = runner.program
    graph, state, ae_graph, ae_state = prog.model_graph, prog.model_state, prog.ae_graph, prog.ae_state

    @jax.jit
    def turn2(model_state, ae_state, dyn, sys_ids, sys_len, prompt_ids, prompt_len, row_keys, think1, image1,
              reflection):
        model, ae = nnx.merge(graph, model_state), nnx.merge(ae_graph, ae_state)
        static = runner.static
        cond, _, _ = irg_loop.think_phase(model, static, dyn, sys_ids, sys_len, prompt_ids, prompt_len, row_keys,
                                          think1)
        before_image = cond
        cond, before_reflection, fed_back, think = irg_loop.reflect_phase(
            model, ae, static, dyn, cond, image1, row_keys, 1, reflection=reflection)
        return irg_loop.refine_phase(model, ae, static, dyn, cond, before_reflection, before_image, think, fed_back,
                                     row_keys, 1)[1]

    return lambda *args: turn2(state, ae_state, *args)


def run(args) -> dict:
    from PIL import Image

    from irg_jax.inference import irg_loop
    from irg_jax.inference.cli import build_runner, start_up
    start_up(args)
    samples, out = pathlib.Path(args.samples), pathlib.Path(args.out)
    scores = json.loads((samples / "scores.json").read_text())
    world = json.loads(pathlib.Path(args.world).read_text())
    runs = verifier_reflections(samples, scores, world["config"]["colours"])
    if not runs:
        raise ValueError(f"{samples / 'scores.json'}: no scored runs")
    runner = build_runner(args, prompts=[r["prompt"] for r in runs])
    program = make_program(runner)
    width = runner.static.max_think_tokens + 1
    for r in runs:  # a given text holds at most max_think_tokens - 1 tokens (irg_loop.given_think)
        for key in ("think1", "reflection"):
            ids = runner.tokenizer.encode(r[key])
            if len(ids) > width - 2:
                r[key] = runner.tokenizer.decode(list(ids[:width - 2]))
    bs = runner.batch_size
    for s in range(0, len(runs), bs):
        chunk = runs[s:s + bs]
        chunk = chunk + [chunk[-1]] * (bs - len(chunk))  # one compiled batch size: pad with the last run
        _, dyn, sys_ids, sys_len, p_ids, p_len, keys, think1 = runner.encode(
            [r["prompt"] for r in chunk], [r["row_id"] for r in chunk], args.seed, [r["think1"] for r in chunk])
        reflection = irg_loop.encode_segments(runner.tokenizer, [r["reflection"] for r in chunk], width,
                                              "given reflection")
        image1 = np.stack([r["image1"] for r in chunk])
        images = np.asarray(program(dyn, sys_ids, sys_len, p_ids, p_len, keys, think1, image1, reflection))
        for r, image in zip(runs[s:s + bs], images):
            folder = out / r["folder"]
            folder.mkdir(parents=True, exist_ok=True)
            for name in ("turn1.png", "turn1.txt"):
                shutil.copyfile(samples / r["folder"] / name, folder / name)
            Image.fromarray(image).save(folder / "turn2.png")
            (folder / "turn2.txt").write_text(r["reflection"], encoding="utf-8")
            (folder / "result.json").write_text(json.dumps(
                {"index": r["row_id"], "prompt": r["prompt"], "reflection": "verifier (given)",
                 "source": str(samples / r["folder"])}, indent=1), encoding="utf-8")
        print(f"turn 2 from the verifier's reflection: {min(s + bs, len(runs))} / {len(runs)} runs", flush=True)
    summary = {"runs": len(runs), "image1_passed": sum(r["passed1"] for r in runs)}
    print(f"wrote {len(runs)} runs to {out}: {json.dumps(summary)}", file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> int:
    from irg_jax.inference.cli import ArgumentParser, add_sampling_flags, run_cli
    p = ArgumentParser(prog="python -m irg_jax.synthetic.given_reflection", description=__doc__.split("\n")[0])
    add_sampling_flags(p)
    p.add_argument("--samples", required=True, help="a verified irg_jax.generate output (with scores.json)")
    p.add_argument("--world", required=True, help="the world's world.json (its colours)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    return run_cli(p.prog, args.debug, lambda: run(args) and 0)


if __name__ == "__main__":
    sys.exit(main())
