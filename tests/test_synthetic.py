"""The synthetic IRG world and the six-mode writer: determinism, on-disk format, flags, round trip."""
import base64
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from irg_jax.data.trajectories import (DEFAULT_FLAG_TABLE, MODES, TrajectoryRecord, main as trajectories_main,
                                       read_records_jsonl, validate_flag_table, write_mode_datasets)
from irg_jax.synthetic import text as synthetic_text
from irg_jax.synthetic.prompts import CATEGORIES, PromptSpec, prompt_space
from irg_jax.synthetic.world import World, WorldConfig, generate

SYSTEM = synthetic_text.SYSTEM_PROMPT_SHORT
# Expected assistant parts per mode, written out from spec §5.3 (not derived from the code):
# (part, type, need_loss, need_vae, need_vit); texts carry only need_loss.
EXPECTED_PARTS = {
    "initial_thinking_understanding_learning": [("think1", "text", True)],
    "initial_thinking_generation_learning": [("think1", "text", False), ("image1", "image", True, False, False)],
    "initial_full_learning": [("think1", "text", True), ("image1", "image", True, False, False)],
    "improving_thinking_understanding_learning": [("think1", "text", False), ("image1", "image", False, True, True),
                                                  ("think2", "text", True)],
    "improving_thinking_generation_learning": [("think1", "text", False), ("image1", "image", False, True, True),
                                               ("think2", "text", False), ("image2", "image", True, False, False)],
    "improving_full_learning": [("think1", "text", True), ("image1", "image", False, True, True),
                                ("think2", "text", True), ("image2", "image", True, False, False)],
}


def _rows(path):
    table = pq.read_table(path)
    assert table.column_names == ["conversation", "row_id"]
    return [(json.loads(c), r) for c, r in zip(table.column("conversation").to_pylist(),
                                                 table.column("row_id").to_pylist())]


def _records(out):
    return {r.id: r for r in read_records_jsonl(out / "records.jsonl")}


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate(out, num=60, seed=5, heldout=30, rows_per_group=25)
    return out


def test_generation_is_deterministic(world_dir, tmp_path):
    generate(tmp_path / "again", num=60, seed=5, heldout=30, rows_per_group=25)
    for name in ("records.jsonl", "heldout_prompts.jsonl", "vocab.json"):
        assert (tmp_path / "again" / name).read_bytes() == (world_dir / name).read_bytes(), name
    for mode in MODES:
        a = pq.read_table(world_dir / mode / "part-00000.parquet")
        b = pq.read_table(tmp_path / "again" / mode / "part-00000.parquet")
        assert a.equals(b), mode
    generate(tmp_path / "other", num=60, seed=6, heldout=30)
    assert (tmp_path / "other" / "records.jsonl").read_bytes() != (world_dir / "records.jsonl").read_bytes()


def test_six_modes_have_the_expected_flags(world_dir):
    records = _records(world_dir)
    assert len(records) == 60
    for mode in MODES:
        path = world_dir / mode / "part-00000.parquet"
        assert pq.ParquetFile(path).metadata.num_row_groups == 3  # 25 + 25 + 10
        rows = _rows(path)
        assert len(rows) == 60
        for conv, row_id in rows:
            assert row_id.startswith(f"{mode}/")
            record = records[row_id.split("/", 1)[1]]
            system, prompt, assistant = conv
            assert system == {"role": "user", "content": synthetic_text.SYSTEM_PROMPT_SHORT, "need_loss": False}
            assert prompt == {"role": "user", "content": record.prompt, "need_loss": False}
            assert assistant["role"] == "assistant"
            parts = assistant["content"]
            expected = EXPECTED_PARTS[mode]
            assert [p["type"] for p in parts] == [e[1] for e in expected]
            for part, (name, kind, *flags) in zip(parts, expected):
                if kind == "text":
                    assert set(part) == {"type", "content", "need_loss"}
                    assert part["need_loss"] is flags[0]
                    assert part["content"] == getattr(record, name)
                else:
                    assert set(part) == {"type", "content", "need_loss", "need_vae", "need_vit"}
                    assert (part["need_loss"], part["need_vae"], part["need_vit"]) == tuple(flags)
                    image = Image.open(io.BytesIO(base64.b64decode(part["content"])))
                    assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)


def test_rows_round_trip_to_the_trajectory(world_dir):
    records = _records(world_dir)
    b64 = lambda data: base64.b64encode(data).decode("ascii")  # noqa: E731
    wrong_first = 0
    for conv, row_id in _rows(world_dir / "improving_full_learning" / "part-00000.parquet"):
        r = records[row_id.split("/", 1)[1]]
        think1, image1, think2, image2 = conv[2]["content"]
        assert (think1["content"], image1["content"], think2["content"], image2["content"]) == \
            (r.think1, b64(r.image1), r.think2, b64(r.image2))
        assert think1["content"].startswith("<think> ") and think1["content"].endswith(" </think>")
        for header in (synthetic_text.SECTION_IMPROVEMENTS, synthetic_text.SECTION_GUIDANCE,
                       synthetic_text.SECTION_FINAL_PROMPT):
            assert f"\n\n{header}\n" in think2["content"]
        wrong_first += r.metadata["defect"] is not None
        assert (r.image1 == r.image2) == (r.metadata["defect"] is None)
    assert 10 < wrong_first < 50  # p = 0.5 over 60 trajectories
    # The initial modes learn the correct image after think 1 (default --initial-image image2).
    for conv, row_id in _rows(world_dir / "initial_full_learning" / "part-00000.parquet"):
        assert conv[2]["content"][1]["content"] == b64(records[row_id.split("/", 1)[1]].image2)


def test_rows_load_with_the_data_pipeline_reader(world_dir):
    """Every row of every mode parses with irg_format into the plan, ids and pixels its flags describe."""
    irg_format = pytest.importorskip("irg_jax.data.irg_format")
    from irg_jax.data.tokenizer import WordTokenizer
    from irg_jax.data.transforms import ImageTransform

    words = json.loads((world_dir / "vocab.json").read_text())["words"]
    tokenizer = WordTokenizer.from_corpus(words)
    decoder = irg_format.RowDecoder(tokenizer, ImageTransform(32, 32, 16), ImageTransform(28, 28, 14),
                                    fail_fast=True)
    records = _records(world_dir)
    pixels = lambda png: np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))  # noqa: E731
    for mode in MODES:
        rows = irg_format.ParquetRows([str(world_dir / mode)])
        ids = [row_id.split("/", 1)[1] for _, row_id in _rows(world_dir / mode / "part-00000.parquet")]
        assert len(rows) == len(ids) == 60
        for i, record_id in enumerate(ids):
            record, sample = records[record_id], decoder(rows[i])
            plan, texts, images = [("text", False), ("text", False)], [SYSTEM, record.prompt], []
            for name, kind, *flags in EXPECTED_PARTS[mode]:
                if kind == "text":
                    plan.append(("text", flags[0]))
                    texts.append(getattr(record, name))
                    continue
                # Initial modes learn the correct image after think 1 (the generator's default).
                png = record.image2 if (name == "image2" or mode.startswith("initial")) else record.image1
                loss, vae, vit = flags
                plan += [("vae_image", True)] * loss + [("vae_image", False)] * vae + [("vit_image", False)] * vit
                images += [pixels(png)] * (loss + vae) + [None] * vit
            assert [(item.type, item.loss) for item in sample.plan] == plan, (mode, record_id)
            assert list(sample.text_ids) == [tuple(tokenizer.encode(t)) for t in texts]
            assert all(tokenizer.unk_id not in ids_ for ids_ in sample.text_ids)
            assert len(sample.images) == len(images)
            for got, want in zip(sample.images, images):
                if want is None:  # ViT copy, resized to the ViT stride
                    assert got.shape == (28, 28, 3)
                else:
                    assert np.array_equal(got, want)


def test_trajectories_cli_with_paths_and_custom_flags(tmp_path, world_dir):
    records = list(read_records_jsonl(world_dir / "records.jsonl"))[:5]
    lines = []
    for r in records:
        (tmp_path / f"{r.id}_1.png").write_bytes(r.image1)
        lines.append(json.dumps({"id": r.id, "prompt": r.prompt, "think1": r.think1, "reflection": r.think2,
                                 "image1_path": f"{r.id}_1.png", "image2_b64": base64.b64encode(r.image2).decode()}))
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    table = {"improving_full_learning": {"think1": {"need_loss": False},
                                         "image1": {"need_loss": True, "need_vae": True, "need_vit": True},
                                         "think2": {"need_loss": True}, "image2": {"need_loss": True}}}
    (tmp_path / "flags.json").write_text(json.dumps(table))
    assert trajectories_main(["--records", str(tmp_path / "records.jsonl"), "--out", str(tmp_path / "out"),
                              "--flag-table", str(tmp_path / "flags.json"), "--no-system-prompt"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["improving_full_learning"]
    rows = _rows(tmp_path / "out" / "improving_full_learning" / "part-00000.parquet")
    assert len(rows) == 5
    for (conv, _), r in zip(rows, records):
        assert [t["role"] for t in conv] == ["user", "assistant"] and conv[0]["content"] == r.prompt
        image1 = conv[1]["content"][1]
        assert (image1["need_loss"], image1["need_vae"], image1["need_vit"]) == (True, True, True)
        assert base64.b64decode(image1["content"]) == r.image1
        assert conv[1]["content"][3]["need_vae"] is False  # unspecified flags are written as false


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="improving_full_learning/image2"):
        validate_flag_table({"improving_full_learning": {"image2": {"need_loss": False}}})
    with pytest.raises(ValueError, match="unknown part 'image3'"):
        validate_flag_table({"m": {"image3": {"need_loss": True}}})
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "prompt": "p", "think1": "t", "think2": "r", "image1_b64": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*image1_b64"):
        list(read_records_jsonl(tmp_path / "bad.jsonl"))
    (tmp_path / "bad2.jsonl").write_text("\n{not json\n")
    with pytest.raises(ValueError, match=r"bad2.jsonl:2: malformed JSON"):
        list(read_records_jsonl(tmp_path / "bad2.jsonl"))
    validate_flag_table(DEFAULT_FLAG_TABLE)


def test_initial_image_source_image1(tmp_path):
    record = TrajectoryRecord("r0", "a circle", "<think> x </think>", b"one", "<think> y </think>", b"two")
    write_mode_datasets([record], tmp_path, initial_image_source="image1", system_prompt=None)
    (conv, _), = _rows(tmp_path / "initial_full_learning" / "part-00000.parquet")
    assert base64.b64decode(conv[1]["content"][1]["content"]) == b"one"


def test_heldout_prompts_never_occur_in_training(world_dir):
    world = World(WorldConfig(), seed=5)
    held = {c: set(k) for c, k in world.heldout_keys.items()}
    assert all(held[c] for c in CATEGORIES)  # every category holds out at least one meaning
    for index in range(3000):
        spec = world.trajectory(index).spec
        assert spec.key not in held[spec.category], spec.text
    lines = [json.loads(l) for l in (world_dir / "heldout_prompts.jsonl").read_text().splitlines()]
    assert len(lines) == 30 and {l["category"] for l in lines} == set(CATEGORIES)
    train_prompts = {r.prompt for r in read_records_jsonl(world_dir / "records.jsonl")}
    for line in lines:
        spec = PromptSpec.from_json(line["constraints"])
        assert spec.text == line["prompt"] and spec.key in held[spec.category]
        assert line["prompt"] not in train_prompts


def test_vocab_lists_every_emitted_word(world_dir):
    vocab = set(json.loads((world_dir / "vocab.json").read_text())["words"])
    world = World(WorldConfig(), seed=1)
    texts = [synthetic_text.SYSTEM_PROMPT_SHORT]
    for c in CATEGORIES:
        texts += [s.text for s in prompt_space(c)]
    for index in range(2000):
        t = world.trajectory(index)
        texts += [t.think1, t.think2]
    missing = {w for text in texts for w in text.split()} - vocab
    assert not missing
    assert len(vocab) < 150  # a small word-level vocabulary


def test_sizes(tmp_path):
    summary = generate(tmp_path / "w64", num=1000, seed=0, cfg=WorldConfig(size=64), heldout=12)
    assert summary["rows_per_mode"] == {m: 1000 for m in MODES}
    r = next(read_records_jsonl(tmp_path / "w64" / "records.jsonl"))
    assert Image.open(io.BytesIO(r.image2)).size == (64, 64)


def test_zero_jitter_centres_every_lone_object_in_its_cell():
    world = World(WorldConfig(jitter=0.0), seed=3)
    seen = 0
    for i in range(200):
        traj = world.trajectory(i)
        if traj.spec.category != "single_object" and traj.spec.category != "colors":
            continue
        (obj,), (group,) = traj.objects, traj.plan
        r, c = divmod(synthetic_text.CELL_WORDS.index(group.place), 3)
        cell = 32 / 3
        assert abs(obj.cx - (c + 0.5) * cell) <= 1 and abs(obj.cy - (r + 0.5) * cell) <= 1, (group, obj)
        seen += 1
    assert seen > 20
    with pytest.raises(ValueError, match="jitter"):
        WorldConfig(jitter=0.5)


def test_quality_defects_draw_the_right_scene_badly(world_dir):
    world = World(WorldConfig(quality_prob=1.0), seed=2)
    vocab = set(json.loads((world_dir / "vocab.json").read_text())["words"])
    quality = 0
    for record in world.records(120):
        defect = record.metadata["defect"]
        if defect is None or defect["type"] != "quality":
            continue
        quality += 1
        assert record.metadata["objects_image1"] == record.metadata["objects"]  # same scene
        bad, good = (np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), np.int16) for b in (record.image1, record.image2))
        assert np.abs(bad - good).mean() > 2.0  # visibly different pixels
        assert "blotchy" in record.think2 and "stray" in record.think2
        assert set(record.think2.split()) <= vocab
    assert quality > 40  # every defect-free trajectory (about half) is drawn badly at quality_prob 1
    # quality_prob 0 (the default) leaves the world exactly as before: no quality defects at all
    assert all((r.metadata["defect"] or {}).get("type") != "quality" for r in World(WorldConfig(), seed=2).records(60))
