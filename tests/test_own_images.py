"""Improving data from the model's own first images: reflections from the verifier, the rewritten world."""
import base64
import dataclasses
import io
import json

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from flax import nnx
from PIL import Image

from irg_jax.synthetic import own_images, scenes
from irg_jax.synthetic import text as synthetic_text
from irg_jax.synthetic.world import World, WorldConfig, generate
from irg_jax.data.tokenizer import WordTokenizer
from irg_jax.data.trajectories import MODES, SECTION_FINAL_PROMPT, read_records_jsonl
from irg_jax.model import config as model_config
from irg_jax.model.bagel import Bagel
from irg_jax.convert.params_dir import save_params
from irg_jax.synthetic.verify import verify_image

CFG = WorldConfig(jitter=0.0)


def _trajectory(category: str, world=World(CFG, seed=3)):
    return next(t for t in (world.trajectory(i) for i in range(200))
                if t.spec.category == category and t.defect is None)


def _render(objects) -> np.ndarray:
    return np.array(scenes.render_scene(objects, CFG.size))


def _vocab() -> set[str]:
    return set(synthetic_text.corpus_words(CFG.colours))


def test_a_correct_image_gets_the_already_matches_reflection():
    t = _trajectory("color_attr")
    verdict = verify_image(t.spec.text, _render(t.objects))
    assert verdict.passed and own_images.findings(verdict) == {}
    body = own_images.plan_body(t.think1)
    assert own_images.own_reflection(t.think1, {}) == t.think2  # the world's own no-defect reflection
    assert t.think2.endswith(f"{SECTION_FINAL_PROMPT}\n{body} </think>")


def test_findings_name_what_the_verifier_saw():
    t = _trajectory("color_attr")  # two objects, both coloured
    missing = verify_image(t.spec.text, _render(t.objects[:1]))
    found = own_images.findings(missing)
    gone = t.spec.groups[1]
    assert found["own_missing"] == f"the {gone.colour} {gone.shape} is missing ."
    assert not missing.passed and set(found) <= {"own_missing", "own_too_few"}

    t = _trajectory("position")
    mirrored = [dataclasses.replace(o, cx=CFG.size - o.cx, cy=CFG.size - o.cy) for o in t.objects]
    found = own_images.findings(verify_image(t.spec.text, _render(mirrored)))
    assert set(found) == {"own_position"} and t.spec.relation in found["own_position"]

    t = next(t for t in (World(CFG, seed=3).trajectory(i) for i in range(400)) if t.spec.category == "single_object"
             and t.defect is None and abs(t.objects[0].cx - 16) >= 8 and abs(t.objects[0].cy - 16) >= 8)
    o = t.objects[0]
    twin = dataclasses.replace(o, cx=CFG.size - o.cx, cy=CFG.size - o.cy)  # the opposite corner
    blob = _render([o, twin])
    # a 3x10 smear (no compact shape) in a free corner: o's side horizontally, the twin's vertically
    y0, x0 = (2 if twin.cy < 16 else CFG.size - 5), (2 if o.cx < 16 else CFG.size - 12)
    blob[y0:y0 + 3, x0:x0 + 10] = scenes.PALETTE[o.colour]
    found = own_images.findings(verify_image(t.spec.text, blob))
    assert set(found) == {"own_too_many", "own_blotchy"}, found

    reflection = own_images.own_reflection(t.think1, found)
    assert set(reflection.split()) <= _vocab(), set(reflection.split()) - _vocab()
    assert reflection.endswith(f"{own_images.plan_body(t.think1)} </think>")


def _tiny_export(tmp_path, vocab_file):
    tok = WordTokenizer.load(str(vocab_file))
    cfg = model_config.tiny()
    cfg.llm.vocab_size = tok.vocab_size
    cfg.autoencoder.update(kind="identity", z_channels=3 * 8 ** 2, scale_factor=1.0, shift_factor=0.0)
    cfg.special_ids = dict(bos=tok.bos_id, eos=tok.eos_id, start_of_image=tok.start_of_image_id,
                           end_of_image=tok.end_of_image_id)
    model = Bagel(cfg, rngs=nnx.Rngs(0))
    model.llm2vae.kernel.set_value(jax.random.normal(jax.random.key(1), model.llm2vae.kernel.shape) * 0.2)
    params = nnx.split(model, nnx.Param, ...)[1].to_pure_dict()
    return save_params(tmp_path / "export", params, cfg, {"source": "test"}, tokenizer_dir=vocab_file)


def test_build_rewrites_the_first_trajectories_with_the_models_images(tmp_path):
    world = tmp_path / "world"
    generate(world, num=10, seed=1, cfg=CFG, heldout=6)
    export = _tiny_export(tmp_path, world / "word_vocab.json")
    out = tmp_path / "own"
    report = own_images.build(world, str(export), out, num=6, batch_size=4, num_steps=2)

    assert report["drawn"] == 6 and report["kept_unchanged"] == 4 and 0 <= report["passed"] <= 6
    assert sum(report["findings"].values()) >= 6 - report["passed"]
    before = list(read_records_jsonl(world / "records.jsonl"))
    after = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["id"] for r in after] == [r.id for r in before]
    vocab = set(json.loads((world / "vocab.json").read_text())["words"])
    for old, new in zip(before[:6], after[:6]):
        assert new["metadata"]["image1_source"] == "model" and new["think1"] == old.think1
        assert set(new["think2"].split()) <= vocab
        assert new["think2"].endswith(f"{own_images.plan_body(old.think1)} </think>")
    for old, new in zip(before[6:], after[6:]):
        assert new["think2"] == old.think2 and "image1_source" not in new["metadata"]

    # improving rows carry the model's image 1 (a random model: not the world's render); image 2 is kept
    rows = pq.read_table(out / "improving_full_learning" / "part-00000.parquet").column("conversation").to_pylist()
    assert len(rows) == 10 and all((out / m / "part-00000.parquet").exists() for m in MODES)
    parts = json.loads(rows[0])[-1]["content"]
    image1, image2 = (Image.open(io.BytesIO(base64.b64decode(p["content"])))
                      for p in parts if p["type"] == "image")
    assert np.asarray(image1).shape == (CFG.size, CFG.size, 3)
    assert not np.array_equal(np.asarray(image1), np.asarray(Image.open(io.BytesIO(before[0].image1))))
    np.testing.assert_array_equal(np.asarray(image2), np.asarray(Image.open(io.BytesIO(before[0].image2))))
    assert json.loads((out / "world.json").read_text())["own_images"]["drawn"] == 6
    assert (out / "word_vocab.json").exists() and (out / "heldout_prompts.jsonl").exists()


def test_build_rejects_more_images_than_trajectories(tmp_path):
    world = tmp_path / "world"
    generate(world, num=3, seed=1, cfg=CFG, heldout=6)
    with pytest.raises(ValueError, match="holds 3 trajectories"):
        own_images.build(world, "unused", tmp_path / "own", num=4)


class _FixedRunner:
    """Stands in for the inference runner: image 1 of record i is ``images[i]``."""

    def __init__(self, images):
        self.images = images

    def run(self, prompts, seed, thinks):
        turn = lambda image: type("Turn", (), {"image": image})  # noqa: E731
        result = lambda image: type("Result", (), {"turns": [turn(image)]})  # noqa: E731
        return [[result(im) for im in self.images[:len(prompts)]]]


@pytest.mark.parametrize("keep_passed", [False, True])
def test_keep_passed_makes_a_passing_image_1_its_own_target(keep_passed):
    world = World(CFG, seed=3)
    records = [world.record(world.trajectory(i)) for i in range(40)]
    records = [r for r in records if r.metadata.get("defect") is None][:2]
    rendered = [np.asarray(Image.open(io.BytesIO(r.image2)).convert("RGB")).copy() for r in records]
    rendered[0][0, 0] = (250, 250, 250)  # passes, but is not the render byte for byte
    blank = np.full_like(rendered[1], 255)  # fails: nothing drawn
    summary = own_images.Summary()
    out = own_images.redraw_records(_FixedRunner([rendered[0], blank]), records, own_images.ParserConfig(),
                                    0, summary, keep_passed=keep_passed)
    assert summary.passed == 1 and summary.drawn == 2
    passed, failed = out
    assert passed.metadata["image2_source"] == ("image1" if keep_passed else "render")
    assert (passed.image2 == passed.image1) == keep_passed
    assert passed.think2 == records[0].think2  # "already matches"
    assert failed.image2 == records[1].image2 and failed.metadata["image2_source"] == "render"
