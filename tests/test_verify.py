"""The verifier: prompt parsing, image parsing, ground-truth accuracy, defect catching, CLI and grid."""
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from irg_jax.synthetic import scenes
from irg_jax.synthetic.prompts import CATEGORIES, ObjectGroup, PromptSpec, prompt_space
from irg_jax.synthetic.world import World, WorldConfig, write_result_folders
from irg_jax.synthetic.verify import ParserConfig, parse_image, parse_prompt, verify_image
from irg_jax.synthetic.verify.__main__ import main as verify_main
from irg_jax.synthetic.verify.grid import main as grid_main

# The constraint kind that must fail for each recorded defect type.
FAILS_AS = {"colour": "colour", "count": "count", "shape": "count", "position": "position"}


def _image(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


def _degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Slight blur and noise, as a generated image might have."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(0.7)), np.float32)
    noisy = blurred + rng.normal(0.0, 8.0, blurred.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def test_every_prompt_parses_back_to_its_constraints():
    for category in CATEGORIES:
        space = prompt_space(category, colours=tuple(scenes.PALETTE))
        assert space
        for spec in space:
            assert parse_prompt(spec.text) == spec, spec.text
    assert parse_prompt("A red circle to the left of a blue square.") == \
        PromptSpec("position", (ObjectGroup("circle", 1, "red"), ObjectGroup("square", 1, "blue")), "left of")
    assert parse_prompt("3 triangles").groups == (ObjectGroup("triangle", 3),)
    for bad in ("a dog", "two", "a red circle near a square", "a circle and", "circles"):
        with pytest.raises(ValueError, match="cannot parse prompt"):
            parse_prompt(bad)


@pytest.mark.parametrize("size,num", [(32, 400), (64, 120)])
def test_ground_truth_passes_and_defects_are_caught(size, num):
    world = World(WorldConfig(size=size), seed=11)
    rng = np.random.default_rng(0)
    defects = caught = 0
    for record in world.records(num):
        prompt, defect = record.prompt, record.metadata["defect"]
        correct = _image(record.image2)
        for image in (correct, _degrade(correct, rng)):
            verdict = verify_image(prompt, image)
            assert verdict.passed, (prompt, [c for c in verdict.constraints if not c.passed])
        if defect is None:
            continue
        defects += 1
        for image in (_image(record.image1), _degrade(_image(record.image1), rng)):
            verdict = verify_image(prompt, image)
            failed = {c.kind for c in verdict.constraints if not c.passed}
            caught += FAILS_AS[defect["type"]] in failed and not verdict.passed
    assert defects > num // 4
    assert caught >= 0.99 * 2 * defects, (caught, 2 * defects)


def test_blank_and_noise_images_fail():
    rng = np.random.default_rng(1)
    images = [np.full((32, 32, 3), 255, np.uint8), np.zeros((32, 32, 3), np.uint8),
              rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
              np.clip(rng.normal(0.0, 1.0, (32, 32, 3)), -1, 1).astype(np.float32)]  # [-1, 1] model output
    prompts = [space[0].text for space in (prompt_space(c) for c in CATEGORIES)]
    for image in images:
        for prompt in prompts:
            assert not verify_image(prompt, image).passed, prompt


def test_hand_built_scene_reports_each_constraint():
    red_circle = scenes.SceneObject("circle", "red", "large", 8, 16, 12)
    blue_square = scenes.SceneObject("square", "blue", "large", 24, 16, 12)
    image = scenes.render_scene([red_circle, blue_square], 32)
    objects = parse_image(image)
    assert [(o.colour, o.shape) for o in objects] == [("blue", "square"), ("red", "circle")]  # largest first
    ok = verify_image("a red circle left of a blue square", image)
    assert ok.passed and [c.kind for c in ok.constraints] == ["count", "count", "colour", "colour", "position"]
    wrong = verify_image("a red circle right of a blue square", image)
    assert [c.kind for c in wrong.constraints if not c.passed] == ["position"]
    assert [c.kind for c in verify_image("a green circle", image).constraints if not c.passed] == ["colour"]
    assert [c.kind for c in verify_image("two circles", image).constraints if not c.passed] == ["count"]
    # A palette restricted to other colours sees nothing.
    assert parse_image(image, ParserConfig(colours=("green", "yellow"))) == []


def test_cli_scores_result_folders_and_grid(tmp_path):
    world = World(WorldConfig(), seed=2)
    records = list(world.records(40))
    write_result_folders(records, tmp_path / "results")
    (tmp_path / "results" / records[0].id / "turn2.png").unlink()  # a prompt without a second turn
    assert verify_main([str(tmp_path / "results")]) == 0
    scores = json.loads((tmp_path / "results" / "scores.json").read_text())
    assert scores["num_prompts"] == 40
    turn1, turn2 = scores["turns"]["turn1"], scores["turns"]["turn2"]
    assert turn1["num_images"] == 40 and turn2["num_images"] == 39
    defective = {r.id for r in records if r.metadata["defect"]}
    assert turn1["prompt_accuracy"] == pytest.approx(1 - len(defective) / 40)
    assert turn2["prompt_accuracy"] == 1.0 and turn2["overall"] == 1.0
    assert set(turn2["per_category"]) == set(CATEGORIES)
    per_cat = {c: [r for r in records[1:] if r.metadata["category"] == c] for c in CATEGORIES}
    for c, rs in per_cat.items():
        assert turn2["per_category"][c]["n"] == len(rs)
    assert turn2["vs_turn1"] == {"prompts": 39, "fixed": len(defective - {records[0].id}), "broken": 0}
    by_folder = {p["folder"]: p for p in scores["prompts"]}
    for r in records:
        assert by_folder[r.id]["turn1"]["passed"] == (r.id not in defective)
    assert "turn2" not in by_folder[records[0].id]
    assert grid_main([str(tmp_path / "results"), "--out", str(tmp_path / "grid.png"), "--rows", "4"]) == 0
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 4 * 128 and grid.height > 4 * 128


def test_cli_names_a_bad_prompt(tmp_path):
    folder = tmp_path / "results" / "p0"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"prompt": "a photo of a dog"}))
    with pytest.raises(ValueError, match=r"p0/result.json: cannot parse prompt"):
        verify_main([str(tmp_path / "results")])
