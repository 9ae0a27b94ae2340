"""The data pipeline against IRG's official outputs (tests/fixtures/irg_data, see its README).

Per-row parses, the five packs (through our expert-sorted layout and back), every row packed
alone, the official iterator run, and the bad rows."""
import json
import logging
import random

import numpy as np
import pytest

from irg_jax.data import packed_batch as pb
from irg_jax.data.irg_format import ParquetRows, RowDecoder, SkipCounter, Skipped
from irg_jax.data.pack_policy import GroupChoice, PackAssembler, PackingPolicy
from irg_jax.data.packing import PackBuilder, PackingRules, logical_view, shifted_timestep, to_packed_batch
from irg_jax.data.tokenizer import HFTokenizer
from irg_jax.data.transforms import ImageTransform, to_unit_range

ABBREV = {"ITU": "initial_thinking_understanding_learning", "ITG": "initial_thinking_generation_learning",
          "IF": "initial_full_learning", "IMTU": "improving_thinking_understanding_learning",
          "IMTG": "improving_thinking_generation_learning", "IMF": "improving_full_learning"}
STAGE1 = [("improving_full_learning", True, 1.0), ("initial_full_learning", True, 1.0),
          ("improving_thinking_generation_learning", True, 0.5), ("initial_thinking_generation_learning", True, 0.5),
          ("improving_thinking_understanding_learning", False, 0.5), ("initial_thinking_understanding_learning", False, 0.5)]
ARRAY_KEYS = ("packed_text_ids", "packed_text_indexes", "packed_position_ids", "packed_vae_token_indexes",
              "packed_latent_position_ids", "mse_loss_indexes", "packed_vit_token_indexes",
              "packed_vit_position_ids", "vit_token_seqlens", "ce_loss_indexes", "packed_label_ids",
              "patchified_vae_latent_shapes")


class OfficialRandom:
    """IRG's streams: Python ``random`` for CFG dropout and group choice, numpy's legacy
    global generator for the timestep logits, both seeded with 1234."""

    def __init__(self, seed=1234):
        self.py, self.np = random.Random(seed), np.random.RandomState(seed)

    def uniform(self):
        return self.py.random()

    def normal(self):
        return self.np.randn()


@pytest.fixture(scope="module")
def irg(fixtures_dir):
    root = fixtures_dir / "irg_data"
    tok = HFTokenizer.from_dir(str(root / "tokenizer"))
    decoder = RowDecoder(tok, ImageTransform(1024, 512, 16), ImageTransform(980, 378, 14))
    sources, cache = {}, {}

    def rows(group):
        if group not in sources:
            sources[group] = ParquetRows([str(root / "IRG-Toy_Dataset" / group)])
        return sources[group]

    def sample(group, row):
        if (group, row) not in cache:
            cache[(group, row)] = decoder(rows(group)[row])
        return cache[(group, row)]

    def rules(text=0.0, vit=0.0, vae=0.0):
        return PackingRules(tok.bos_id, tok.eos_id, tok.start_of_image_id, tok.end_of_image_id,
                            text_cond_dropout_prob=text, vit_cond_dropout_prob=vit, vae_cond_dropout_prob=vae,
                            timestep_shift=4.0)

    logging.disable(logging.WARNING)
    yield dict(root=root, tok=tok, decoder=decoder, rows=rows, sample=sample, rules=rules)
    logging.disable(logging.NOTSET)


def _budgets_for(lp):
    u = lp.usage()
    hw = (max(u.max_h, 16) + 32, max(u.max_w, 16) + 16)  # a bucket larger than every image
    return pb.PackBudgets(u.und + 5, u.gen + 3, max(u.vit, 1) + 2, max(u.ce, 1) + 1, u.vae_images + 1, hw)


def _allowed_from_layout(pack, lo, hi):
    """Dense attention rule (spec §2.5) evaluated on our layout for logical positions [lo, hi)."""
    real = np.flatnonzero(pack["kind"] != pb.PAD)
    rows = real[np.argsort(pack["seq_pos"][real])][lo:hi]
    sp, doc = pack["seq_pos"][rows], pack["doc_id"][rows]
    split, mode = pack["split_id"][rows], pack["split_mode"][rows]
    same_split = split[:, None] == split[None, :]
    allowed = (sp[None, :] <= sp[:, None]) | (same_split & (mode[:, None] != pb.CAUSAL))
    allowed &= ~((mode[None, :] == pb.NOISE) & ~same_split)
    return allowed & (doc[:, None] == doc[None, :])


def test_tokenizer_special_ids(irg):
    tok = irg["tok"]
    assert (tok.bos_id, tok.eos_id, tok.start_of_image_id, tok.end_of_image_id) == (151644, 151645, 151652, 151653)
    assert tok.vocab_size == 151665
    assert tok.encode("Hello world") == [9707, 1879]


def test_rows_match_official_parse(irg):
    meta = json.loads((irg["root"] / "rows.json").read_text())
    images = np.load(irg["root"] / "rows_images.npz")
    for e in meta["rows"]:
        s = irg["sample"](e["group"], e["row"])
        where = f"{e['group']}/{e['row']}"
        plan = [{"type": p.type, "enable_cfg": int(p.enable_cfg), "loss": int(p.loss),
                 "special_token_loss": 0, "special_token_label": None} for p in s.plan]
        assert plan == e["sequence_plan"], where
        assert [list(t) for t in s.text_ids] == e["text_ids_list"], where
        assert s.num_tokens == e["num_tokens"] and s.length_estimate() == e["packer_length_estimate"], where
        assert len(s.images) == len(e["image_tensors"]), where
        for img, t in zip(s.images, e["image_tensors"]):
            ref = images[t["npz_key"]]
            assert img.transpose(2, 0, 1).shape == ref.shape, t["npz_key"]
            assert np.abs(img.transpose(2, 0, 1).astype(int) - ref).max() <= 1, t["npz_key"]


@pytest.mark.parametrize("index", range(5))
def test_packs_match_official(irg, index):
    meta = json.loads((irg["root"] / "packs.json").read_text())[index]
    ref = np.load(irg["root"] / "packs" / f"{meta['name']}.npz")
    p = meta["cond_dropout_probs"]
    builder, rand = PackBuilder(irg["rules"](p["text"], p["vit"], p["vae"])), OfficialRandom(meta["seed"])
    for name in meta["samples_in_order"]:
        group, row = name.split("/")
        builder.add(irg["sample"](group, int(row)), rand)
    lp = builder.finish()
    assert lp.num_tokens == meta["sequence_length"]
    budgets = _budgets_for(lp)
    pack = to_packed_batch(lp, budgets)
    pb.check_pack(pack, budgets)
    view = logical_view(pack, budgets)

    for key in ARRAY_KEYS:
        if key in ref:
            np.testing.assert_array_equal(np.asarray(view[key]), ref[key], err_msg=key)
        else:
            assert len(view[key]) == 0, key
    np.testing.assert_array_equal(view["sample_lens"], ref["sample_lens"])
    np.testing.assert_array_equal(view["split_lens"], ref["flex_split_lens"][:-1])
    assert view["attn_modes"] == list(ref["flex_attn_modes"][:-1])
    if "packed_timesteps" in ref:  # raw logits: exact; stored times: the shift of them
        np.testing.assert_array_equal(lp.latent_u, ref["packed_timesteps"])
        np.testing.assert_allclose(view["latent_t"], shifted_timestep(ref["packed_timesteps"], 4.0), rtol=1e-6)
        assert (view["latent_t"][~np.isfinite(ref["packed_timesteps"])] == 0).all()
    if "ce_loss_weights" in ref:
        np.testing.assert_allclose(lp.ce_weights, ref["ce_loss_weights"], rtol=1e-6)
    if "packed_vit_tokens_u8" in ref:
        np.testing.assert_allclose(view["packed_vit_tokens"], to_unit_range(ref["packed_vit_tokens_u8"]),
                                   atol=2 / 255 * 1.0001)
    for i, crop in enumerate(view["vae_image_crops"]):
        want = to_unit_range(ref[f"vae_image_u8_{i}"].transpose(1, 2, 0))
        assert crop.shape == want.shape
        np.testing.assert_allclose(crop, want, atol=2 / 255 * 1.0001)
    starts = np.concatenate([[0], np.cumsum(ref["sample_lens"])])
    for i in range(len(ref["sample_lens"])):
        np.testing.assert_array_equal(_allowed_from_layout(pack, starts[i], starts[i + 1]), ref[f"attn_allowed_{i}"],
                                      err_msg=f"mask of sample {i}")


def test_every_row_packed_alone(irg):
    meta = json.loads((irg["root"] / "rows.json").read_text())["rows"]
    singles = np.load(irg["root"] / "singles.npz")
    for e in meta:
        key = f"{e['group']}/r{e['row']}"
        builder = PackBuilder(irg["rules"]())
        builder.add(irg["sample"](e["group"], e["row"]), OfficialRandom())
        lp = builder.finish()
        budgets = _budgets_for(lp)
        view = logical_view(to_packed_batch(lp, budgets), budgets)
        for k in ARRAY_KEYS:
            if f"{key}/{k}" in singles:
                np.testing.assert_array_equal(np.asarray(view[k]), singles[f"{key}/{k}"], err_msg=f"{key} {k}")
        if f"{key}/packed_timesteps" in singles:
            np.testing.assert_array_equal(lp.latent_u, singles[f"{key}/packed_timesteps"])
        assert list(view["split_lens"]) == list(singles[f"{key}/split_lens"][:-1]), key


def test_iterator_run_replay(irg):
    """IRG's ``PackedDataset.__iter__`` on the stage-1 yaml, three packs: same samples, same arrays."""
    meta = json.loads((irg["root"] / "iterator_run.json").read_text())
    ref = np.load(irg["root"] / "iterator_run.npz")
    cfg = meta["config"]
    cursors = [0] * len(STAGE1)

    def draw(g):
        i = cursors[g]
        cursors[g] += 1
        rows = irg["rows"](STAGE1[g][0])
        return i, irg["sample"](STAGE1[g][0], i % len(rows))

    budgets = pb.PackBudgets(40000, 40000, 20000, 4000, 64, (1024, 1024))
    policy = PackingPolicy(cfg["expected_num_tokens"], cfg["max_num_tokens"], cfg["max_num_tokens_per_sample"],
                           cfg["prefer_buffer_before"], cfg["max_buffer_size"])
    asm = PackAssembler([GroupChoice(*g) for g in STAGE1], policy, irg["rules"](), budgets, SkipCounter())
    rand = OfficialRandom()
    for k, want in enumerate(meta["packs"]):
        res = asm.next_pack(draw, rand)
        got = [f"{STAGE1[g][0]}/{i % len(irg['rows'](STAGE1[g][0]))}" for g, i in res.members]
        assert got == want["samples_in_order"], k
        view = logical_view(to_packed_batch(res.pack, budgets), budgets)
        for key in ARRAY_KEYS:
            if f"pack{k}/{key}" in ref:
                np.testing.assert_array_equal(np.asarray(view[key]), ref[f"pack{k}/{key}"], err_msg=f"pack{k} {key}")
        # flex-mode lengths end with the pad entry (negative for the overrun third pack)
        np.testing.assert_array_equal(view["sample_lens"], ref[f"pack{k}/sample_lens"][:-1])
        np.testing.assert_array_equal(view["split_lens"], ref[f"pack{k}/split_lens"][:-1])
        np.testing.assert_array_equal(res.pack.latent_u, ref[f"pack{k}/packed_timesteps"])
    # The third pack starts with four mandatory samples (20968 > max_num_tokens, as in IRG). IRG then
    # draws 50 samples into its buffer and drops the 51st to emit it (its log: "Yielding data with
    # length 20968"); ours emits it at once, having drawn nothing more, and loses nothing.
    assert "Yielding data with length 20968" in meta["printed_log"]
    assert res.stats["tokens"] == 20968 and res.stats["drawn"] == 4 and asm.buffer == []


def test_bad_rows(irg):
    root = irg["root"]
    counter = SkipCounter()
    rows = ParquetRows([str(root / "IRG-Toy_Dataset" / "bad_rows")], counter)
    assert counter.skipped["missing_column"] == 2  # part-00001 has a 'messages' column only
    got = {i: irg["decoder"](rows[i]) for i in range(len(rows))}
    skipped = {i: s.reason for i, s in got.items() if isinstance(s, Skipped)}
    assert skipped == {1: "malformed_json", 2: "undecodable_base64", 3: "undecodable_image",
                       5: "conversation_not_a_list", 6: "conversation_not_a_list",
                       7: "assistant_content_not_a_list", 8: "empty_plan", 9: "undecodable_image",
                       13: "null_conversation", 14: "bad_flag"}
    for i, s in skipped.items():
        assert got[i].source.endswith(f"part-00000.parquet row {i}")
    assert "image_without_flags_dropped" in got[4].notes and not got[4].images
    assert "data_uri_prefix_stripped" in got[11].notes
    assert "truncated_image_decoded_partially" in got[12].notes
    assert "unknown_part_type_ignored" in got[15].notes
    images = np.load(root / "rows_images.npz")
    official = json.loads((root / "bad_rows.json").read_text())["yielded"]
    for y in official:
        s = got[y["row"]]
        if isinstance(s, Skipped):
            continue  # rows the official code yields with a silently dropped image
        assert [list(t) for t in s.text_ids] == y["text_ids_list"], y["row"]
        for img, key in zip(s.images, y["image_npz_keys"]):
            assert np.abs(img.transpose(2, 0, 1).astype(int) - images[key]).max() <= 1, key
