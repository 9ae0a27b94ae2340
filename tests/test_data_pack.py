"""Packing: a two-sample pack against the spec's positions and masks; budgets, overflow, skips."""
import dataclasses
import json

import numpy as np
import pytest

from _irg_rows import assistant, image_b64, image_part, text_part, user
from irg_jax.data import packed_batch as pb
from irg_jax.data.irg_format import SkipCounter, parse_conversation
from irg_jax.data.pack_policy import GroupChoice, PackAssembler, PackingPolicy
from irg_jax.data.packing import PackBuilder, PackingRules, logical_view, rebucket, sample_usage, to_packed_batch
from irg_jax.data.tokenizer import WordTokenizer
from irg_jax.data.transforms import ImageTransform

TOK = WordTokenizer.from_corpus(["draw a red circle think one two"])
RULES = PackingRules(TOK.bos_id, TOK.eos_id, TOK.start_of_image_id, TOK.end_of_image_id,
                     max_latent_size=8, vit_max_patches_per_side=4, timestep_shift=4.0)
BUDGETS = pb.PackBudgets(und_len=40, gen_len=16, vit_len=6, ce_len=8, num_vae_images=4, vae_image_size=(48, 32))


class FixedRandom:
    def __init__(self, u=0.5, z=0.0):
        self.u, self.z = u, z

    def uniform(self):
        return self.u

    def normal(self):
        return self.z


def sample(conv):
    return parse_conversation(json.dumps(conv), tokenizer=TOK, vae_transform=ImageTransform(32, 32, 16),
                              vit_transform=ImageTransform(28, 28, 14), source="mem")


T2I = sample([user("draw a red circle"), assistant(image_part(image_b64(32, 32), need_loss=True))])
# prompt, think (loss), image1 = target + clean VAE + ViT, think (loss)
FULL = sample([user("a"), assistant(text_part("think one"), image_part(image_b64(32, 32, seed=1), need_loss=True,
                                                                       need_vae=True, need_vit=True),
                                    text_part("two"))])


def build(samples, rand=None, rules=RULES):
    b = PackBuilder(rules)
    for s in samples:
        b.add(s, rand or FixedRandom())
    lp = b.finish()
    return lp, to_packed_batch(lp, BUDGETS)


def in_logical_order(pack, key):
    real = np.flatnonzero(pack["kind"] != pb.PAD)
    return pack[key][real[np.argsort(pack["seq_pos"][real])]]


def test_two_sample_pack_positions():
    lp, pack = build([T2I, FULL])
    pb.check_pack(pack, BUDGETS)
    assert lp.sample_lens == [12, 28]
    want_rope = (list(range(6)) + [6] * 6                     # T2I: [bos 4 ids eos], noisy image (rope stays)
                 + [0, 1, 2] + [3, 4, 5, 6]                   # FULL restarts: prompt, think one
                 + [7] * 6 + [7] * 6 + [8] * 6 + [9, 10, 11])  # noisy, clean copy (same rope), ViT, think two
    assert in_logical_order(pack, "rope_pos").tolist() == want_rope
    assert in_logical_order(pack, "doc_id").tolist() == [0] * 12 + [1] * 28
    modes = in_logical_order(pack, "split_mode").tolist()
    assert modes == [pb.CAUSAL] * 6 + [pb.NOISE] * 6 + [pb.CAUSAL] * 7 + [pb.NOISE] * 6 + [pb.FULL] * 12 + [pb.CAUSAL] * 3
    # expert sort: und section = text, markers, ViT; gen section = latents; order kept within each
    n_und = 40 - 12
    assert (pack["kind"][:n_und] != pb.LATENT).all() and (pack["kind"][BUDGETS.und_len:BUDGETS.und_len + 12] == pb.LATENT).all()
    assert (np.diff(pack["seq_pos"][:n_und]) > 0).all()
    # CE: [bos]+ids of loss texts predict ids+[eos]
    view = logical_view(pack, BUDGETS)
    assert view["ce_loss_indexes"].tolist() == [15, 16, 17, 37, 38]
    ids = TOK.encode("think one") + [TOK.eos_id] + TOK.encode("two") + [TOK.eos_id]
    assert view["packed_label_ids"].tolist() == ids
    text_ids = in_logical_order(pack, "text_ids")
    assert text_ids[np.array(view["ce_loss_indexes"]) + 1].tolist() == ids  # already shifted by one
    # timesteps: u = 0 -> sigmoid 0.5 -> shift 4: 0.8 for the two noisy images, 0 for the clean copy
    assert view["latent_t"].tolist() == pytest.approx([0.8] * 8 + [0.0] * 4)
    assert pack["latent_noisy"][:12].tolist() == [True] * 8 + [False] * 4
    assert (pack["latent_src"][:12] // 6).tolist() == [0] * 4 + [1] * 4 + [2] * 4  # 3 images; bucket grid 3x2
    assert (pack["latent_src"][:4] % 6).tolist() == [0, 1, 2, 3]  # 2x2 latents at rows 0-1 of the 3x2 grid
    assert pack["latent_pos_ids"][:4].tolist() == [0, 1, 8, 9]  # row * max_latent_size + col
    assert (pack["kind"][pack["vit_dest"][:4]] == pb.VIT).all() and pack["vit_pos_ids"][:4].tolist() == [0, 1, 4, 5]
    assert (pack["vit_image_id"][4:] == -1).all() and not pack["ce_valid"][5:].any()
    # padding: its own document, seq_pos continuing after the 40 real tokens
    pad = pack["kind"] == pb.PAD
    assert (pack["doc_id"][pad] == pb.PAD_DOC).all()
    assert sorted(pack["seq_pos"][pad].tolist()) == list(range(40, BUDGETS.seq_len))


def mask(pack):
    """Spec §2.5 over logical order, from the per-token arrays."""
    real = np.flatnonzero(pack["kind"] != pb.PAD)
    rows = real[np.argsort(pack["seq_pos"][real])]
    doc, split, mode = pack["doc_id"][rows], pack["split_id"][rows], pack["split_mode"][rows]
    q, k = np.arange(len(rows))[:, None], np.arange(len(rows))[None, :]
    same = split[:, None] == split[None, :]
    ok = (k <= q) | (same & (mode[:, None] != pb.CAUSAL))
    return ok & ~((mode[None, :] == pb.NOISE) & ~same) & (doc[:, None] == doc[None, :])


def test_two_sample_pack_mask():
    _, pack = build([T2I, FULL])
    m = mask(pack)
    noisy, clean, vit, think2 = range(19, 25), range(25, 31), range(31, 37), range(37, 40)
    assert not m[12, 0] and not m[0, 12]                                  # samples never see each other
    assert all(m[i, j] for i in noisy for j in noisy)                     # noisy image: bidirectional inside
    assert all(m[i, 15] for i in noisy)                                   # ... and sees earlier text
    assert not any(m[i, j] for i in clean for j in noisy)                 # noise invisible to its clean copy
    assert not any(m[i, j] for i in think2 for j in noisy)                # ... and to later text
    assert all(m[i, j] for i in think2 for j in list(clean) + list(vit))  # later text sees clean + ViT
    assert all(m[i, j] for i in clean for j in clean) and not m[25, 31]   # full split bidirectional, causal across
    assert m[6, 0] and not m[0, 6] and not m[5, 6]                        # text before a noisy target is causal


def test_cfg_dropout_semantics():
    drop_all = PackingRules(**{**RULES.__dict__, "text_cond_dropout_prob": 1.0,
                               "vit_cond_dropout_prob": 1.0, "vae_cond_dropout_prob": 1.0})
    lp, pack = build([FULL], FixedRandom(u=0.0), drop_all)
    # texts dropped (rope unchanged), noisy target kept (enable_cfg 0), clean + ViT dropped
    assert lp.sample_lens == [6] and set(lp.rope_pos.tolist()) == {0}
    only_text = PackingRules(**{**RULES.__dict__, "text_cond_dropout_prob": 1.0})
    lp, _ = build([FULL], FixedRandom(u=0.0), only_text)
    assert lp.rope_pos.tolist() == [0] * 6 + [0] * 6 + [1] * 6  # noisy, clean (rope 0 -> 1), ViT (1 -> 2)
    only_vae = PackingRules(**{**RULES.__dict__, "vae_cond_dropout_prob": 1.0})
    lp, _ = build([FULL], FixedRandom(u=0.0), only_vae)
    assert lp.rope_pos.tolist() == [0, 1, 2, 3, 4, 5, 6] + [7] * 6 + [8] * 6 + [9, 10, 11]  # dropped clean: rope +1
    assert len(lp.vae_images) == 1


def test_budget_overflow_raises_with_name():
    big = pb.PackBudgets(und_len=19, gen_len=16, vit_len=6, ce_len=8, num_vae_images=4, vae_image_size=(32, 32))
    b = PackBuilder(RULES)
    b.add(FULL, FixedRandom())
    with pytest.raises(ValueError, match="und_len"):
        to_packed_batch(b.finish(), big)


def test_rebucket_keeps_latent_addresses():
    _, pack = build([T2I, FULL])
    bigger = rebucket(pack, (64, 64), 16)
    assert bigger["vae_images"].shape == (4, 64, 64, 3)
    for src_old, src_new in zip(pack["latent_src"][:12], bigger["latent_src"][:12]):
        i, r = divmod(int(src_old), 3 * 2)  # old grid 3x2 latents
        j, r2 = divmod(int(src_new), 4 * 4)
        assert i == j and divmod(r, 2) == divmod(r2, 4)
    np.testing.assert_array_equal(bigger["vae_images"][:, :48, :32], pack["vae_images"])


# prompt, image 1 as context (clean VAE only), reflection, image 2 (target)
REFINE = sample([user("a"), assistant(image_part(image_b64(32, 32, seed=1), need_vae=True), text_part("two"),
                                      image_part(image_b64(32, 32, seed=2), need_loss=True))])


def test_refinement_bridge_targets_start_from_the_clean_image():
    rules = dataclasses.replace(RULES, refine_bridge_start=0.5, refine_bridge_shift=4.0)
    lp, pack = build([FULL, REFINE], rules=rules)
    # FULL's target has no clean image before it; REFINE's image 2 follows image 1's clean copy
    # (not FULL's, which belongs to another sample).
    assert lp.latent_bridge_image.tolist() == [-1] * 12 + [2] * 4
    view = logical_view(pack, BUDGETS)
    assert view["latent_t"].tolist() == pytest.approx([0.8] * 4 + [0.0] * 4 + [0.0] * 4 + [0.4] * 4)
    assert pack["latent_bridge_w"][:16].tolist() == [0.0] * 12 + [1.0] * 4  # (1 - 0.5) / 0.5
    # image 2's cell (row, col) starts from image 1's token at the same cell
    np.testing.assert_array_equal(pack["latent_bridge_src"][12:16], pack["latent_src"][8:12])
    bigger = rebucket(pack, (64, 64), 16)
    np.testing.assert_array_equal(bigger["latent_bridge_src"][12:16], bigger["latent_src"][8:12])
    # the forward's noise eps + w (x_src - x0) puts x_t at t = r on r eps + (1 - r) x_src
    rng = np.random.default_rng(0)
    tokens, eps = rng.normal(size=(24, 5)), rng.normal(size=(16, 5))
    x0, x_src = tokens[pack["latent_src"][:16]], tokens[pack["latent_bridge_src"][:16]]
    noise = eps + pack["latent_bridge_w"][:16, None] * (x_src - x0)
    x_r = 0.5 * x0 + 0.5 * noise
    np.testing.assert_allclose(x_r[12:], 0.5 * eps[12:] + 0.5 * x_src[12:])
    # off by default: IRG's targets all start from noise
    lp_off, pack_off = build([FULL, REFINE])
    assert (lp_off.latent_bridge_image == -1).all() and not pack_off["latent_bridge_w"].any()


def assembler(policy, groups, budgets=BUDGETS):
    counter = SkipCounter()
    return PackAssembler(groups, policy, RULES, budgets, counter), counter


def streams(*per_group):
    cursors = [0] * len(per_group)

    def draw(g):
        i = cursors[g]
        cursors[g] += 1
        return i, per_group[g][i % len(per_group[g])]
    return draw


def test_over_budget_samples_are_skipped_and_counted():
    n_full = sample_usage(FULL, RULES).tokens  # 28
    asm, counter = assembler(PackingPolicy(expected_num_tokens=12, max_num_tokens=40, max_num_tokens_per_sample=20,
                                           prefer_buffer_before=0), [GroupChoice("g", False, 1.0)])
    res = asm.next_pack(streams([FULL, T2I]), FixedRandom())
    assert n_full > 20 and counter.skipped["over_sample_budget"] == 1
    assert res.members == [(0, 1)] and res.stats["samples"] == 1


def test_overflow_buffer_keeps_every_sample():
    # und_len 30: the mandatory T2I (und 8) and one FULL (und 20) per pack; every second FULL is buffered
    tight = pb.PackBudgets(30, 16, 6, 8, 4, (48, 32))
    asm, counter = assembler(PackingPolicy(60, 60, 40, 20, max_buffer_size=1),
                             [GroupChoice("t2i", True, 0.0), GroupChoice("full", False, 1.0)], tight)
    draw = streams([T2I], [FULL])
    p1 = asm.next_pack(draw, FixedRandom())
    # T2I#0, FULL#0; FULL#1 exceeds und_len -> buffer, which is then full: emit (nothing dropped)
    assert p1.members == [(0, 0), (1, 0)] and [c.index for c in asm.buffer] == [1]
    assert p1.stats["drawn"] == 3 and p1.stats["buffered"] == 1 and p1.stats["buffer_size"] == 1
    for k in range(2, 6):
        p = asm.next_pack(draw, FixedRandom())
        # the buffered FULL comes first (after the mandatory sample), the fresh one waits
        assert p.members == [(0, k - 1), (1, k - 1)] and [c.index for c in asm.buffer] == [k]
        assert p.stats["from_buffer"] == 1 and p.stats["max_wait"] == 1
    assert asm.buffer_state() == {"buffer": [[1, 5, 4]], "head_due": False, "num_packs": 5}
    assert not counter.skipped


def test_unfit_head_opens_the_next_pack():
    # und_len 30: the mandatory FULL (und 20) never fits beside another FULL
    tight = pb.PackBudgets(30, 16, 6, 8, 4, (48, 32))
    asm, _ = assembler(PackingPolicy(60, 60, 40, 60, max_buffer_size=2),
                       [GroupChoice("full", True, 0.0), GroupChoice("t2i", False, 1.0)], tight)
    asm.restore_buffer({"buffer": [[0, 7, 0]], "head_due": False, "num_packs": 0}, lambda g, i: FULL)
    draw = streams([FULL], [T2I])
    p1 = asm.next_pack(draw, FixedRandom())
    # FULL#0 (mandatory); the buffered FULL#7 does not fit and stays first; T2I#0 fits, T2I#1 is buffered
    assert p1.members == [(0, 0), (1, 0)] and [c.index for c in asm.buffer] == [7, 1] and asm.head_due
    p2 = asm.next_pack(draw, FixedRandom())
    # FULL#7 opens the pack; the mandatory FULL#1 no longer fits and goes to the back; T2I#1 fits
    assert p2.members == [(0, 7), (1, 1)] and p2.stats["mandatory_deferred"] == 1
    assert [(c.group, c.index) for c in asm.buffer] == [(0, 1), (1, 2)] and not asm.head_due
    assert p2.stats["max_wait"] == 1
    p3 = asm.next_pack(draw, FixedRandom())
    # FULL#1 (deferred) waits behind T2I#2 but opens no pack: FULL#2 is drawn, then T2I#2 fits
    assert p3.members == [(0, 2), (1, 2)] and [(c.group, c.index) for c in asm.buffer] == [(0, 1), (1, 3)]
    assert asm.head_due
    p4 = asm.next_pack(draw, FixedRandom())
    assert p4.members[0] == (0, 1) and p4.stats["max_wait"] == 2
    # a state from before the buffer kept its order: the carried sample opens the next pack
    asm.restore_buffer({"buffer": [[1, 3]], "carry": [0, 9]}, lambda g, i: FULL if g == 0 else T2I)
    assert [(c.group, c.index) for c in asm.buffer] == [(0, 9), (1, 3)] and asm.head_due
    assert asm.next_pack(draw, FixedRandom()).members[0] == (0, 9)
