"""Pallas attention kernels (TPU and GPU) in Pallas interpret mode against the dense reference.

No TPU or GPU is needed: ``interpret=True`` runs the kernels' grids with the Pallas interpreter
(the TPU kernels keep their scalar-prefetched block lists). Shapes are tiny: interpretation of
a kernel and its two backward kernels takes seconds to trace and compile.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from irg_jax.config.validation import ConfigError, _check_attention
from irg_jax.data.packed_batch import CAUSAL, FULL, NOISE, PAD_DOC
from irg_jax.model import attention
from irg_jax.model.attention import INVALID_DOC, TokenMeta
from irg_jax.model.kernels import block_lists, pallas_gpu, pallas_tpu

KERNELS = {"pallas_tpu": pallas_tpu.attention, "pallas_gpu": pallas_gpu.attention}

# Two packs (a batch of 2) with several documents each, one with a noisy/clean image pair;
# 38 tokens: not a multiple of the 16-token blocks. (document, mode, length) per split.
PACK_A = [(0, CAUSAL, 4), (0, FULL, 5), (0, CAUSAL, 3), (0, NOISE, 4), (0, FULL, 4), (0, CAUSAL, 3),
          (1, CAUSAL, 3), (1, FULL, 3), (1, CAUSAL, 2), (PAD_DOC, CAUSAL, 7)]
PACK_B = [(0, CAUSAL, 6), (1, CAUSAL, 5), (1, FULL, 6), (1, CAUSAL, 2), (2, CAUSAL, 9), (3, NOISE, 4),
          (3, FULL, 4), (3, CAUSAL, 2)]


def pack_meta(*packs, order=None) -> TokenMeta:
    rows = []
    for segments in packs:
        doc, split, mode = [], [], []
        for i, (d, m, n) in enumerate(segments):
            doc, split, mode = doc + [d] * n, split + [i] * n, mode + [m] * n
        fields = [np.asarray(a) for a in (doc, split, mode, np.arange(len(doc)))]
        rows.append([a[order] if order is not None else a for a in fields])
    return TokenMeta(*(jnp.asarray(np.stack(f), jnp.int32) for f in zip(*rows)))


def cache_meta(b: int, capacity: int, filled: int, new: int):
    """Cache keys (filled slots: doc 0, FULL, split -1, pos = slot; empty: INVALID_DOC) + new tokens."""
    slots = np.arange(capacity)
    km = TokenMeta(*(jnp.asarray(np.broadcast_to(a, (b, capacity)), jnp.int32) for a in (
        np.where(slots < filled, 0, INVALID_DOC), np.full(capacity, -1), np.full(capacity, FULL), slots)))
    qm = TokenMeta(*(jnp.asarray(np.broadcast_to(a, (b, new)), jnp.int32) for a in (
        np.zeros(new), np.full(new, 5), np.full(new, CAUSAL), filled + np.arange(new))))
    return qm, km


def random_qkv(seed, b, lq, lk, hq, hk, d):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return f(b, lq, hq, d), f(b, lk, hk, d), f(b, lk, hk, d), f(b, lq, hq, d)


def check_against_dense(fn, q, k, v, weights, qm, km, **blocks):
    kernel = jax.jit(lambda q, k, v: fn(q, k, v, qm, km, interpret=True, **blocks))
    dense = lambda q, k, v: attention.dense_attention(q, k, v, qm, km)  # noqa: E731
    np.testing.assert_allclose(kernel(q, k, v), dense(q, k, v), atol=1e-5, rtol=1e-5, err_msg="forward")
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2)))(q, k, v)
             for f in (kernel, dense)]
    for name, got, want in zip("qkv", *grads):
        assert float(jnp.abs(want).max()) > 1e-3  # the gradient is not trivially zero
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("impl", sorted(KERNELS))
def test_kernel_matches_dense_on_multi_document_packs(impl):
    """Batch of two packs with different documents, GQA (4 query heads on 2), block padding."""
    total = sum(n for *_, n in PACK_A)
    order = np.random.default_rng(0).permutation(total)  # storage order != logical order
    qm = pack_meta(PACK_A, PACK_B, order=order)
    q, k, v, w = random_qkv(1, 2, total, total, 4, 2, 8)
    check_against_dense(KERNELS[impl], q, k, v, w, qm, qm, block_q=16, block_k=16)


@pytest.mark.parametrize("impl", sorted(KERNELS))
def test_kernel_few_queries_against_a_long_cache(impl):
    """3 new text tokens against a 70-slot cache with 37 filled slots (empty slots: INVALID_DOC)."""
    qm, km = cache_meta(1, capacity=70, filled=37, new=3)
    q, k, v, w = random_qkv(2, 1, 3, 70, 4, 1, 16)
    check_against_dense(KERNELS[impl], q, k, v, w, qm, km, block_q=16, block_k=16)


def test_queries_with_no_visible_key_give_zeros_in_both_kernels():
    qm = TokenMeta(*(jnp.asarray(a, jnp.int32)[None] for a in ([0, 0, 7, 7], [0] * 4, [CAUSAL] * 4, [6, 7, 8, 9])))
    km = TokenMeta(*(jnp.asarray(a, jnp.int32)[None] for a in ([0] * 5 + [INVALID_DOC], [-1] * 6, [FULL] * 6,
                                                              range(6))))
    q, k, v, _ = random_qkv(3, 1, 4, 6, 2, 1, 8)
    want = attention.dense_attention(q, k, v, qm, km)
    for fn in KERNELS.values():
        out = np.asarray(jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, qm, km, block_q=16, block_k=16,
                                                          interpret=True))(q, k, v))
        np.testing.assert_array_equal(out[0, 2:], 0.0)
        np.testing.assert_allclose(out, want, atol=1e-6)


def tile_any(qm, km, bq, bk):
    """The block mask implied by the token mask: any allowed pair per (query block, key block)."""
    mask = np.asarray(attention.allowed_mask(qm, km))
    b, lq, lk = mask.shape
    nq, nk = -(-lq // bq), -(-lk // bk)
    padded = np.zeros((b, nq * bq, nk * bk), bool)
    padded[:, :lq, :lk] = mask
    return padded.reshape(b, nq, bq, nk, bk).any(axis=(2, 4))


def test_block_lists_skip_masked_blocks():
    # Two causal documents of 32 tokens, 16-token blocks: 3 tiles each out of 16.
    meta = pack_meta([(0, CAUSAL, 32), (1, CAUSAL, 32)])
    share = block_lists.block_share(meta, meta, 16, 16)
    assert share == dict(computed=6, total=16, causal=10)
    # A multi-document pack in storage order: the counts equal the tiles the token mask implies.
    meta = pack_meta(PACK_A, PACK_B)
    want = tile_any(meta, meta, 8, 8)
    qm, km, lists = block_lists.prepare(meta, meta, 38, 38, 8, 8)
    np.testing.assert_array_equal(lists.q_count, want.sum(-1))
    np.testing.assert_array_equal(lists.k_count, want.sum(-2))
    assert int(lists.q_count.sum()) < want.size
    for b in range(2):
        for i in range(want.shape[1]):
            n = int(lists.q_count[b, i])
            np.testing.assert_array_equal(lists.q_idx[b, i, :n], np.flatnonzero(want[b, i]))
            assert (np.asarray(lists.q_idx[b, i, n:]) == lists.q_idx[b, i, max(n - 1, 0)]).all()
        for j in range(want.shape[2]):
            n = int(lists.k_count[b, j])
            np.testing.assert_array_equal(lists.k_idx[b, j, :n], np.flatnonzero(want[b, :, j]))
    # The cache case: the 3 queries see only the filled key blocks.
    qm, km = cache_meta(1, capacity=70, filled=37, new=3)
    assert block_lists.block_share(qm, km, 16, 16)["computed"] == 3  # blocks 0-2 hold slots 0..36


def test_auto_resolves_by_backend_and_validation_names_the_key():
    assert jax.default_backend() == "cpu"
    assert attention.resolve("auto") == "chunked"
    assert attention.resolve("pallas_gpu") == "pallas_gpu"
    assert {"auto", "chunked", "dense", "pallas_gpu", "pallas_tpu"} <= set(attention.names())
    q, k, v, _ = random_qkv(5, 1, 9, 9, 2, 2, 4)
    meta = pack_meta([(0, CAUSAL, 4), (0, FULL, 5)])
    np.testing.assert_array_equal(attention.auto_attention(q, k, v, meta, meta, block_q=4, block_k=4),
                                  attention.chunked_attention(q, k, v, meta, meta, block_q=4, block_k=4))
    for impl in ("auto", "chunked", "dense", "pallas_tpu", "pallas_gpu"):
        _check_attention(ml_collections.ConfigDict({"impl": impl, "block_q": 128, "block_k": 128}))
    with pytest.raises(ConfigError, match="model.attention.impl"):
        _check_attention(ml_collections.ConfigDict({"impl": "flash", "block_q": 128, "block_k": 128}))
    with pytest.raises(ConfigError, match="model.attention.block_k"):
        _check_attention(ml_collections.ConfigDict({"impl": "pallas_gpu", "block_q": 128, "block_k": 96}))
    with pytest.raises(ConfigError, match="model.attention.block_q"):
        _check_attention(ml_collections.ConfigDict({"impl": "chunked", "block_q": 0, "block_k": 128}))
