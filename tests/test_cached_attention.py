"""Attention against a KV cache: same result as dense attention over [cache | new], reading only filled blocks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from irg_jax.data.packed_batch import CAUSAL, FULL
from irg_jax.model import cached_attention
from irg_jax.model.attention import INVALID_DOC, TokenMeta, dense_attention

LAYERS, HQ, HK, D = 3, 4, 2, 8


def _cache_meta(length, cap):
    b = length.shape[0]
    slot = jnp.broadcast_to(jnp.arange(cap, dtype=jnp.int32), (b, cap))
    doc = jnp.where(slot < length[:, None], 0, INVALID_DOC).astype(jnp.int32)
    return TokenMeta(doc, jnp.full((b, cap), -1, jnp.int32), jnp.full((b, cap), FULL, jnp.int32), slot)


def _new_meta(length, n, mode, valid_rows):
    b = length.shape[0]
    off = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    doc = jnp.where(valid_rows[:, None], 0, INVALID_DOC) * jnp.ones((b, n), jnp.int32)
    return TokenMeta(doc.astype(jnp.int32), jnp.zeros((b, n), jnp.int32), jnp.full((b, n), mode, jnp.int32),
                     (length[:, None] + off).astype(jnp.int32))


def _inputs(seed, b, cap, n):
    ks = jax.random.split(jax.random.key(seed), 5)
    keys = jax.random.normal(ks[0], (LAYERS, b, cap, HK, D))
    values = jax.random.normal(ks[1], (LAYERS, b, cap, HK, D))
    q = jax.random.normal(ks[2], (b, n, HQ, D))
    k = jax.random.normal(ks[3], (b, n, HK, D))
    v = jax.random.normal(ks[4], (b, n, HK, D))
    return keys, values, q, k, v


@pytest.mark.parametrize("mode", [CAUSAL, FULL])
@pytest.mark.parametrize("n, block_q, block_k", [(1, 4, 8), (11, 4, 8), (11, 64, 5), (6, 3, 64)])
def test_matches_dense_over_cache_and_new_keys(mode, n, block_q, block_k):
    b, cap, layer = 3, 37, 1  # capacity not a multiple of the block: the last block overlaps
    keys, values, q, k, v = _inputs(0, b, cap, n)
    length = jnp.array([0, 13, 29], jnp.int32)  # an empty row, rows of different lengths
    valid = jnp.array([True, True, False])  # an inactive row: its outputs are ignored
    new_meta = _new_meta(length, n, mode, valid)
    view = cached_attention.CacheView(keys, values, length, jnp.int32(layer))
    got, back = jax.jit(lambda *a: cached_attention.attend(*a, block_q=block_q, block_k=block_k))(
        q, k, v, new_meta, new_meta, view)
    np.testing.assert_array_equal(np.asarray(back.keys), np.asarray(keys))  # read only: the cache comes back unchanged
    want = dense_attention(q, jnp.concatenate([keys[layer], k], 1), jnp.concatenate([values[layer], v], 1),
                           new_meta, TokenMeta.concat([_cache_meta(length, cap), new_meta]))
    np.testing.assert_allclose(np.asarray(got)[:2], np.asarray(want)[:2], atol=1e-5, rtol=1e-5)


def test_reads_only_the_filled_blocks():
    """Blocks past the longest row are never read: NaNs stored there do not reach the output."""
    b, cap, n, block_k = 2, 64, 3, 8
    keys, values, q, k, v = _inputs(1, b, cap, n)
    length = jnp.array([5, 19], jnp.int32)  # filled blocks: 0..2 (slots 0..23)
    keys = keys.at[:, :, 24:].set(jnp.nan)
    values = values.at[:, :, 24:].set(jnp.nan)
    meta = _new_meta(length, n, CAUSAL, jnp.array([True, True]))
    view = cached_attention.CacheView(keys, values, length, jnp.int32(0))
    out, _ = cached_attention.attend(q, k, v, meta, meta, view, block_q=8, block_k=block_k)
    assert np.isfinite(np.asarray(out)).all()
    # and the guard is meaningful: one more filled block reaches the NaNs
    view = view._replace(length=jnp.array([5, 25], jnp.int32))
    meta = _new_meta(view.length, n, CAUSAL, jnp.array([True, True]))
    out, _ = cached_attention.attend(q, k, v, meta, meta, view, block_q=8, block_k=block_k)
    assert np.isnan(np.asarray(out)[1]).any()


def test_writes_new_keys_at_their_slots_before_reading():
    b, cap, n, layer = 2, 16, 3, 2
    keys, values, q, k, v = _inputs(2, b, cap, n)
    length = jnp.array([4, 9], jnp.int32)
    slots = jnp.array([[4, 5, 6], [9, 10, 16]], jnp.int32)  # the last one is past the capacity: dropped
    meta = _new_meta(length, n, CAUSAL, jnp.array([True, True]))
    view = cached_attention.CacheView(keys, values, length, jnp.int32(layer), slots)
    out, back = cached_attention.attend(q, k, v, meta, meta, view, block_q=8, block_k=4)
    want_keys = np.asarray(keys).copy()
    want_keys[layer, 0, 4:7] = np.asarray(k)[0]
    want_keys[layer, 1, 9:11] = np.asarray(k)[1, :2]
    np.testing.assert_array_equal(np.asarray(back.keys), want_keys)
    # the written slots are not read a second time as cache entries
    ref, _ = cached_attention.attend(q, k, v, meta, meta, view._replace(slots=None), block_q=8, block_k=4)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)
