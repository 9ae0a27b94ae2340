"""The demo's report: every figure in report.md comes from the report dict (no training here)."""
import dataclasses
import pathlib

from irg_jax.synthetic import demo


def _turn(overall, fixed=None, broken=None):
    out = {"overall": overall, "prompt_accuracy": overall, "per_category": {"counting": overall, "position": 0.0},
           "per_constraint": {"count": overall}}
    if fixed is not None:
        out["vs_turn1"] = {"prompts": 40, "fixed": fixed, "broken": broken}
    return out


def _report(quick=False):
    metrics = {"first": {"step": 10, "ce": 4.7, "mse": 1.78, "step_time": 3.9},
               "last": {"step": 40, "ce": 0.54, "mse": 1.19, "step_time": 1.36}}
    return {"seed": 1, "quick": quick, "plan": dataclasses.asdict(demo.QUICK if quick else demo.FULL),
            "num_prompts": 20, "samples_per_prompt": 2,
            "accuracy": {"trained": {"turn1": _turn(0.25), "turn2": _turn(0.3, fixed=3, broken=1)},
                         "untrained": {"turn1": _turn(0.0), "turn2": _turn(0.0, fixed=0, broken=0)}},
            "margin_turn2_minus_turn1": 0.05, "training": {"stage1": metrics, "stage2": metrics},
            "own_images": {"drawn": 64, "passed": 8, "pass_rate": 0.125, "findings": {"own_too_few": 50}},
            "timings_s": {"stage1": 94.0, "stage2": 69.0, "total": 300.0}}


def test_report_md_states_the_margin_both_models_and_the_timings(tmp_path):
    demo.write_report(tmp_path, _report())
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# IRG demo report (seed 1)")
    assert "| category | untrained turn1 | untrained turn2 | trained turn1 | trained turn2 |" in md
    assert "| counting | 0.000 | 0.000 | 0.250 | 0.300 |" in md
    assert "**+0.050**" in md and "Turn 2 fixed 3 and broke 1 of 40 runs." in md
    assert "| stage1 | 40 | 4.700 / 1.780 | 0.540 / 1.190 | 1.36 | 94 s |" in md
    assert "passed 8 (12.5%)" in md and "own_too_few 50" in md
    assert "| total | 300 |" in md and "![grid](grid.png)" in md
    assert (tmp_path / "report.json").exists()


def test_generate_args_carry_the_plan_and_drop_prompts_for_the_given_reflection_run():
    x, out = pathlib.Path("/x"), pathlib.Path("/out")
    plan = dataclasses.replace(demo.FULL, refine_start=0.45, refine_timestep_shift=1.25, cfg_text=1.75)
    args = demo.generate_args(x, pathlib.Path("/p.jsonl"), out, 32, x, plan, 3)
    assert args[args.index("--refine_start") + 1] == "0.45"
    assert args[args.index("--refine_timestep_shift") + 1] == "1.25"
    assert args[args.index("--cfg_text") + 1] == args[args.index("--refine_cfg_text") + 1] == "1.75"
    assert args[args.index("--seed") + 1] == "3" and args[args.index("--prompts") + 1] == "/p.jsonl"
    given = demo.generate_args(x, None, out, 32, x, plan, 3)
    assert "--prompts" not in given and given[given.index("--out") + 1] == "/out"
    assert [a for a in args if a not in ("--prompts", "/p.jsonl")] == given


def test_train_args_name_the_repository_configs():
    """The demo's stages run from any working directory: the config paths point into this repository."""
    args = demo.train_args(2, pathlib.Path("/w"), pathlib.Path("/run"), 5, 1, init_from=pathlib.Path("/s1"))
    path, arg = args[args.index("--config") + 1].split(":", 1)
    assert pathlib.Path(path) == pathlib.Path(__file__).resolve().parent.parent / "configs" / "irgl_stage2.py"
    assert pathlib.Path(path).is_file() and arg == "demo,data_root=/w,init_from=/s1"


def _runs(root, reflections, passed):
    for folder, text in reflections.items():
        (root / folder).mkdir(parents=True)
        (root / folder / "turn2.txt").write_text(text)
    return {"prompts": [{"folder": f, "turn1": {"passed": p1}, "turn2": {"passed": p2}}
                        for f, (p1, p2) in passed.items()]}


def test_refinement_breakdown_counts_both_turn2_rows_and_the_agreement(tmp_path):
    matches = "<think> the previous image already matches the prompt .\n\n### Detailed ..."
    missing = "<think> the blue square is missing .\n\n### Detailed ..."
    too_few = "<think> the image shows too few squares .\n\n### Detailed ..."
    # the model's own reflections (detokenised spacing) and turn-2 verdicts
    own = _runs(tmp_path / "own", {"0": "< think> the previous image already matches the prompt.### x",
                                   "1": "< think> the blue square is missing.### x",
                                   "2": "< think> the previous image already matches the prompt.### x",
                                   "3": "< think> the image shows too few circles.### x",
                                   "9": "< think> the previous image already matches the prompt.### x"},
                {"0": (True, True), "1": (True, False), "2": (False, False), "3": (False, True), "9": (True, True)})
    # the verifier's reflections: 0 passes, 1 passes (the model named a defect), 2 and 3 fail
    given = _runs(tmp_path / "given", {"0": matches, "1": matches, "2": missing, "3": too_few},
                  {"0": (True, True), "1": (True, True), "2": (False, True), "3": (False, True)})
    ref = demo.refinement_breakdown(tmp_path / "own", own, tmp_path / "given", given)  # run 9: not in given
    assert ref["own_reflection"] == {"runs": 4, "image1_passed": 2, "image2_passed": 2, "fixed": 1, "broken": 1,
                                     "accuracy_turn1": 0.5, "accuracy_turn2": 0.5}
    assert ref["verifier_reflection"] == {"runs": 4, "image1_passed": 2, "image2_passed": 4, "fixed": 2,
                                          "broken": 0, "accuracy_turn1": 0.5, "accuracy_turn2": 1.0}
    # verdicts: 0 agrees (matches / passed), 3 agrees (names a defect / failed); 1 and 2 do not.
    # findings: 0 says the verifier's sentence; 3 names circles where the verifier found squares.
    assert ref["agreement"] == {"runs": 4, "same_verdict": 2, "same_findings": 1, "passed_says_matches": 1,
                                "passed": 2, "failed_names_defect": 1, "failed": 2}
    demo.write_report(tmp_path, {**_report(), "refinement": ref})
    md = (tmp_path / "report.md").read_text()
    assert "| with the model's own reflection | 4 | 2 (0.500) | 2 (0.500) | 1 | 1 |" in md
    assert "| with the verifier's findings as the reflection (teacher-forced) | 4 | 2 (0.500) | 4 (1.000) | 2 | 0 |" in md
    assert "same verdict 2 (says 'already matches' for 1 of 2 passing, names a defect for 1 of 2 failing)" in md
    assert "same findings 1" in md


def test_reflection_agreement_counts_verdicts_against_the_verifier(tmp_path):
    reflections = {"0": "< think> the previous image already matches the prompt.### Detailed ...",
                   "1": "< think> the blue square is missing.### Detailed ...",
                   "2": "< think> the previous image already matches the prompt.### ...",
                   "3": "< think> the image shows too few squares.### ..."}
    passed = {"0": (True, True), "1": (True, False), "2": (False, False), "3": (False, True)}
    for folder, text in reflections.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "turn2.txt").write_text(text)
    (tmp_path / "4").mkdir()  # a run without a reflection file is not counted
    runs = [{"folder": f, "turn1": {"passed": p1}, "turn2": {"passed": p2}} for f, (p1, p2) in passed.items()]
    runs.append({"folder": "4", "turn1": {"passed": True}, "turn2": {"passed": True}})
    cells = demo.reflection_agreement(tmp_path, {"prompts": runs})
    assert cells == {
        "image1_passed": {"reflection_matches": {"runs": 1, "image2_passed": 1},
                          "reflection_names_defect": {"runs": 1, "image2_passed": 0}},
        "image1_failed": {"reflection_matches": {"runs": 1, "image2_passed": 0},
                          "reflection_names_defect": {"runs": 1, "image2_passed": 1}}}
    report = {**_report(), "reflection_agreement": cells}
    demo.write_report(tmp_path, report)
    md = (tmp_path / "report.md").read_text()
    assert "| passed | matches | 1 | 1 |" in md and "| failed | names defect | 1 | 1 |" in md


def test_given_reflection_rewrites_a_decoded_think_in_the_training_form():
    from irg_jax.synthetic.own_images import own_reflection
    from irg_jax.synthetic.given_reflection import canonical_think
    decoded = "< think> a large red square at the bottom right.</ think>"
    assert canonical_think(decoded) == "<think> a large red square at the bottom right . </think>"
    # the verifier's reflection repeats the plan once, without nested think markers
    text = own_reflection(canonical_think(decoded), {})
    assert text.count("think>") == 2 and text.endswith("a large red square at the bottom right . </think>")
