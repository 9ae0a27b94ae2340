"""MFU: model FLOPs count the attention the mask allows, hardware FLOPs the tiles computed."""
import logging
import math
import types

import jax.numpy as jnp
import numpy as np

from irg_jax.config.irgl import irgl_config
from irg_jax.data.packed_batch import PackBudgets
from irg_jax.model.attention import CAUSAL, NOISE, TokenMeta, allowed_mask
from irg_jax.model.bagel import training_flops
from irg_jax.model.kernels.block_lists import block_share
from irg_jax.train import mfu


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
    assert a_c == allowed and chunked > computed  # the union of the two packs' tiles, for both
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
