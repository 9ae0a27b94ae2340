"""MFU: model FLOPs count the attention the mask allows, hardware FLOPs the tiles computed."""
import logging
import math
import types

import jax
import jax.numpy as jnp
import numpy as np

from _segment_pack import pack_from_segments
from irg_jax.config.irgl import irgl_config
from irg_jax.data.packed_batch import PackBudgets
from irg_jax.model.attention import CAUSAL, NOISE, TokenMeta, allowed_mask
from irg_jax.model.bagel import training_flops
from irg_jax.model.kernels.block_lists import block_share
from irg_jax.parallel.mesh import build_mesh
from irg_jax.train import mfu
from irg_jax.train.setup import train_setup


def _packs():
    """Two packs of 40 tokens: documents of text (causal), a noisy image (full) and padding."""
    def pack(lengths):
        doc, split, mode, pos = [], [], [], []
        for d, (text, image) in enumerate(lengths):
            doc += [d] * (text + image)
            split += list(range(text)) + [text] * image
            mode += [CAUSAL] * text + [NOISE] * image
            pos += list(range(text)) + [text] * image
        pad = 40 - len(doc)
        doc += [2**30] * pad
        split += list(range(1000, 1000 + pad))
        mode += [CAUSAL] * pad
        pos += list(range(pad))
        return doc, split, mode, pos
    rows = [pack([(5, 8), (7, 4), (3, 6)]), pack([(10, 12), (2, 4)])]
    return TokenMeta(*(jnp.asarray(np.array(f), jnp.int32) for f in zip(*rows)))


def test_attention_pairs_count_the_mask_and_the_tiles():
    meta = _packs()
    allowed = float(allowed_mask(meta, meta).sum())
    a, computed = np.asarray(mfu.attention_pairs(*meta, block_q=8, block_k=8))
    assert a == allowed and allowed < 2 * 40 * 40
    assert computed == block_share(meta, meta, 8, 8)["computed"] * 64
    a_c, chunked = np.asarray(mfu.attention_pairs(*meta, block_q=8, block_k=8, impl="chunked"))
    assert a_c == allowed and chunked > computed  # per query block, both packs step as often as the busier one
    assert np.asarray(mfu.attention_pairs(*meta, block_q=8, block_k=8, impl="dense"))[1] == 2 * 40 * 40


def test_split_flops_separates_model_and_hardware_attention():
    model = irgl_config(1, "tiny").model
    b = PackBudgets(und_len=24, gen_len=16, vit_len=0, ce_len=8, num_vae_images=1, vae_image_size=(16, 16),
                    vit_patch_dim=1)
    full = 2 * 40.0 * 40
    f = mfu.split_flops(model, 2, b, allowed_pairs=0.1 * full, computed_pairs=0.4 * full)
    assert f["model"] < f["hardware"]
    assert math.isclose(f["attention_allowed_share"], 0.1) and math.isclose(f["attention_computed_share"], 0.4)
    # every pair allowed and computed: the old analytic count (full L^2 per pack)
    dense = mfu.split_flops(model, 2, b, full, full)
    expect = training_flops(model, batch=2, und_len=24, gen_len=16, vit_len=0, ce_len=8)
    assert math.isclose(dense["model"], expect, rel_tol=1e-9) and dense["model"] == dense["hardware"]


def test_unknown_device_kind_logs_mfu_unavailable_and_goes_on(caplog):
    device = types.SimpleNamespace(device_kind="NVIDIA B200", platform="gpu")
    with caplog.at_level(logging.WARNING):
        peak, source = mfu.peak_flops_per_device(device)
    assert math.isnan(peak) and "MFU unavailable" in source
    assert "MFU unavailable" in caplog.text
    assert math.isnan(mfu.mfu(1e12, 1.0, peak, 8))
    known = types.SimpleNamespace(device_kind="TPU v5 lite", platform="tpu")
    assert mfu.peak_flops_per_device(known)[0] == 197e12


def test_train_step_window_sums_each_batchs_attention_pairs():
    """The loop's MFU pairs are the step's window sums: two steps of the real train step add up
    exactly :func:`mfu.batch_attention_pairs` of their two batches, and ``window_pairs`` (what
    the loop reports) is their mean."""
    config = irgl_config(1, "tiny")
    config.batch_size = 2  # on 2 of the 8 devices: the batch sharded, a small compile
    config.model.attention.block_q = config.model.attention.block_k = 8  # several tiles per pack
    ids = config.model.special_ids
    text = lambda n: [ids.bos] + [7] * (n - 2) + [ids.eos]  # noqa: E731
    # Same budgets, different masks: one document, or two documents sharing the pack.
    one_doc = [(0, "text", text(9)), (0, "noisy", 4), (0, "text", text(5))]
    two_docs = [(0, "text", text(6)), (0, "noisy", 4), (1, "text", text(8))]
    packs = [pack_from_segments(s, config.model, vae_image_size=(32, 32))[0] for s in (one_doc, two_docs)]
    setup = train_setup(config, build_mesh(config.mesh, jax.devices()[:2]))
    setup.place_constants()
    state, window = setup.create_state(setup.init_params()), setup.new_window(0)
    rows = [0, 1], [1, 1]  # one pack of each; both two_docs
    batches = [jax.device_put({k: np.stack([packs[r][k] for r in rs]) for k in packs[0]}, setup.batch_sharding)
               for rs in rows]
    with setup.active():
        for batch in batches:
            state, window, _ = setup.step(state, batch, window, *setup.constants)
        # on the step's mesh: chunked runs each device's packs on their own (shard_map), so a
        # pack's computed tiles follow its own device's busiest pack, not the whole batch's
        want = [np.asarray(mfu.batch_attention_pairs(b, config.model.attention)) for b in batches]
    host = jax.device_get(window)
    whole = np.asarray(mfu.batch_attention_pairs(batches[0], config.model.attention))  # no mesh: one device
    assert whole[0] == want[0][0] and whole[1] > want[0][1], (whole, want[0])
    assert want[0][0] != want[1][0] and want[0][0] < want[0][1]  # the batches differ; not every pair computed is allowed
    got = np.stack([host["sums"][k] for k in mfu.PAIR_SUMS])
    np.testing.assert_array_equal(got, want[0] + want[1])
    np.testing.assert_array_equal(mfu.window_pairs(host["sums"], int(host["steps"])), (want[0] + want[1]) / 2)
