"""Attention of new tokens against a KV cache, at a cost that follows the filled context.

Inference appends blocks of new tokens (one decoded token, a prompt, an image) to a
fixed-capacity cache. The keys of one attention are the cache's filled slots plus the
block's own keys. Instead of concatenating the whole cache with the new keys in every
layer (a copy of the full capacity per layer and per token), this module runs one
online softmax over

  1. the cache, in blocks of ``block_k`` slots read with ``dynamic_slice`` straight from
     the stacked ``[num_layers, B, capacity, Hk, D]`` arrays at the layer's index, for
     ``ceil(max(length) / block_k)`` blocks only (a length-bounded ``fori_loop``), then
  2. the new keys, in static blocks.

The mask is the same rule as everywhere (:func:`irg_jax.model.attention.allowed_mask`):
cache slots ``< length`` are earlier tokens of document 0 (``FULL`` mode, no split),
other slots belong to no document. Inference only: there is no VJP.

The new keys are written into the cache (a scatter at their slots) *before* the reads:
the reads only look at slots below each row's length, so they do not see them, and every
read of this layer then comes after the write while the next layer's write depends on this
layer's output. XLA can thus update the cache in place. Writing after the loop instead,
into the arrays the loop read, makes XLA copy the whole cache per layer and token (the
loop's input stays live until the write, so the two cannot share a buffer).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from irg_jax.data.packed_batch import FULL
from irg_jax.model.attention import (_NEG, _PAD_QUERY_DOC, INVALID_DOC, TokenMeta, _blocks, _meta_blocks, _pad_to,
                                     _unblocks, allowed_mask, online_softmax_block)


class CacheView(NamedTuple):
    """One layer's view of a KV cache (the arrays of all layers and the layer's index)."""

    keys: jax.Array    # [num_layers, B, capacity, Hk, D]
    values: jax.Array  # [num_layers, B, capacity, Hk, D]
    length: jax.Array  # int32 [B] filled slots per row
    layer: jax.Array   # int32 scalar: which layer's slice to read
    slots: jax.Array | None = None  # int32 [B, n]: where the n new keys go (>= capacity: dropped);
                                    # None: read only


def _cache_block_meta(length: jax.Array, start: jax.Array, first_slot: jax.Array, size: int) -> TokenMeta:
    """Metadata of the ``size`` slots from ``first_slot``; slots before ``start`` (already read) or
    past a row's length belong to no document."""
    b = length.shape[0]
    slot = jnp.broadcast_to(first_slot + jnp.arange(size, dtype=jnp.int32), (b, size))
    filled = (slot >= start) & (slot < length[:, None])
    return TokenMeta(jnp.where(filled, 0, INVALID_DOC).astype(jnp.int32), jnp.full((b, size), -1, jnp.int32),
                     jnp.full((b, size), FULL, jnp.int32), slot)


def _attend_block_of_queries(qb, qmb: TokenMeta, k_new, v_new, new_meta: TokenMeta, cache: CacheView, block_k: int):
    """qb [B, bq, Hk, G, D] -> out [B, bq, Hk, G, D] over the filled cache (below ``length``) and the new keys."""
    b, bq, hk, g, d = qb.shape
    cap = cache.keys.shape[2]
    bk = min(block_k, cap)
    stats = (jnp.full((b, hk, g, bq), _NEG, jnp.float32), jnp.zeros((b, hk, g, bq), jnp.float32),
             jnp.zeros((b, hk, g, bq, d), jnp.float32))

    def cache_block(i, stats):
        start = i * bk
        first = jnp.minimum(start, cap - bk)  # the last block may overlap the one before it
        kb = jax.lax.dynamic_slice(cache.keys, (cache.layer, 0, first, 0, 0), (1, b, bk, hk, d))[0]
        vb = jax.lax.dynamic_slice(cache.values, (cache.layer, 0, first, 0, 0), (1, b, bk, hk, d))[0]
        mask = allowed_mask(qmb, _cache_block_meta(cache.length, start, first, bk))[:, None, None]
        return online_softmax_block(stats, qb, kb.astype(qb.dtype), vb.astype(qb.dtype), mask)

    num_cache_blocks = (jnp.max(cache.length) + bk - 1) // bk
    carry = jax.lax.fori_loop(0, num_cache_blocks, cache_block, stats)

    n_new = k_new.shape[1]
    bn = min(block_k, n_new)
    for a in range(0, n_new, bn):  # static: the new block is short (a token, a prompt, an image)
        kmb = TokenMeta(*(t[:, a:a + bn] for t in new_meta))
        mask = allowed_mask(qmb, kmb)[:, None, None]
        carry = online_softmax_block(carry, qb, k_new[:, a:a + bn], v_new[:, a:a + bn], mask)
    m, l, acc = carry
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return jnp.moveaxis(out, 3, 1).astype(qb.dtype)


def attend(q, k_new, v_new, q_meta: TokenMeta, new_meta: TokenMeta, cache: CacheView, *,
           block_q: int, block_k: int) -> tuple[jax.Array, CacheView]:
    """q [B, Lq, Hq, D], new keys/values [B, Lq, Hk, D] (the queries' own) -> (out [B, Lq, Hq, D], cache).

    The returned ``cache`` holds the new keys/values at ``cache.slots`` (if given).
    """
    b, lq, hq, d = q.shape
    hk = k_new.shape[2]
    if cache.slots is not None:
        rows = jnp.arange(b)[:, None]
        cache = cache._replace(
            keys=cache.keys.at[cache.layer, rows, cache.slots].set(k_new.astype(cache.keys.dtype), mode="drop"),
            values=cache.values.at[cache.layer, rows, cache.slots].set(v_new.astype(cache.values.dtype), mode="drop"))
    qg = q.reshape(b, lq, hk, hq // hk, d)
    bq = min(block_q or lq, lq)
    if lq <= bq:
        out = _attend_block_of_queries(qg, q_meta, k_new, v_new, new_meta, cache, block_k)
        return out.reshape(b, lq, hq, d), cache
    nq = -(-lq // bq)  # query blocks as in the chunked attention; padded queries attend to nothing

    def one(args):
        qb, qmb = args
        return _attend_block_of_queries(qb, qmb, k_new, v_new, new_meta, cache, block_k)

    out = jax.lax.map(one, (_blocks(_pad_to(qg, 1, nq * bq, 0), nq), _meta_blocks(q_meta, nq, nq * bq, _PAD_QUERY_DOC)))
    return _unblocks(out)[:, :lq].reshape(b, lq, hq, d), cache
