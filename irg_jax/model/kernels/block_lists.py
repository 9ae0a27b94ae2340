"""Which (query block, key block) tiles of a packed attention have any allowed pair.

The kernels skip every tile whose mask (spec §2.5, :func:`irg_jax.model.attention.mask_rule`)
is all false. The decision is exact: it is the "any" of the token mask over the tile, computed
one query block at a time (O(block_q x Lk) live values, never Lq x Lk).

The tiles to visit are handed to the kernels as lists: for each query block the indices of its
key blocks with an allowed pair, ascending, and their count (``q_idx [B, nq, nk]``,
``q_count [B, nq]``); the same for each key block over query blocks (``k_idx [B, nk, nq]``,
``k_count [B, nk]``, for the dK/dV pass). Entries past the count repeat the last valid index
(0 when the count is 0), so that a kernel stepping over them asks for the block it already
holds: on TPU the pipeline then issues no copy for the skipped steps.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from irg_jax.data.packed_batch import CAUSAL
from irg_jax.model.attention import INVALID_DOC, TokenMeta, mask_rule

PAD_QUERY_DOC = INVALID_DOC - 1  # padded query rows: a document no key has, so they see nothing
_PAD_SPLIT, _PAD_MODE, _PAD_POS = -1, CAUSAL, 2**30


class BlockLists(NamedTuple):
    q_idx: jax.Array    # int32 [B, nq, nk]: key blocks to visit per query block (forward, dQ)
    q_count: jax.Array  # int32 [B, nq]
    k_idx: jax.Array    # int32 [B, nk, nq]: query blocks to visit per key block (dK, dV)
    k_count: jax.Array  # int32 [B, nk]


def pad_meta(meta: TokenMeta, size: int, *, query: bool) -> TokenMeta:
    """Pad every field to ``size`` tokens: padded queries see nothing, padded keys are seen by none."""
    doc = PAD_QUERY_DOC if query else INVALID_DOC
    extra = size - meta.doc_id.shape[1]
    if extra < 0:
        raise ValueError(f"pad_meta: {meta.doc_id.shape[1]} tokens do not fit in {size}")
    return TokenMeta(*(jnp.pad(a.astype(jnp.int32), ((0, 0), (0, extra)), constant_values=f)
                       for a, f in zip(meta, (doc, _PAD_SPLIT, _PAD_MODE, _PAD_POS))))


def block_mask(q_meta: TokenMeta, k_meta: TokenMeta, block_q: int, block_k: int) -> jax.Array:
    """bool [B, nq, nk]: does tile (i, j) hold at least one allowed (query, key) pair.

    The metadata must already be padded to multiples of the block sizes (:func:`pad_meta`).
    """
    b, lq = q_meta.doc_id.shape
    lk = k_meta.doc_id.shape[1]
    if lq % block_q or lk % block_k:
        raise ValueError(f"block_mask: lengths {lq}, {lk} are not multiples of blocks {block_q}, {block_k}")
    nq, nk = lq // block_q, lk // block_k
    q_blocks = TokenMeta(*(jnp.moveaxis(a.reshape(b, nq, block_q), 1, 0) for a in q_meta))
    k_fields = tuple(a[:, None, :] for a in k_meta)

    def one_query_block(qm: TokenMeta) -> jax.Array:
        tile = mask_rule(*(a[:, :, None] for a in qm), *k_fields)  # [B, bq, Lk]
        return tile.reshape(b, block_q, nk, block_k).any(axis=(1, 3))  # [B, nk]

    return jnp.moveaxis(jax.lax.map(one_query_block, q_blocks), 0, 1)


def lists_from_mask(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """bool [B, n, m] -> (int32 [B, n, m] indices of the true entries first, int32 [B, n] counts)."""
    count = mask.sum(-1, dtype=jnp.int32)
    order = jnp.argsort(~mask, axis=-1, stable=True).astype(jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    steps = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jnp.where(steps < count[..., None], order, last), count


def build(q_meta: TokenMeta, k_meta: TokenMeta, block_q: int, block_k: int) -> BlockLists:
    """Block lists of padded metadata for the forward/dQ pass and the dK/dV pass."""
    mask = block_mask(q_meta, k_meta, block_q, block_k)
    q_idx, q_count = lists_from_mask(mask)
    k_idx, k_count = lists_from_mask(jnp.swapaxes(mask, 1, 2))
    return BlockLists(q_idx, q_count, k_idx, k_count)


def prepare(q_meta: TokenMeta, k_meta: TokenMeta, lq: int, lk: int, block_q: int, block_k: int):
    """Pad metadata to block multiples; return rows int32 [B, 4, Lq_pad], [B, 4, Lk_pad] and the lists."""
    qm = pad_meta(q_meta, -(-lq // block_q) * block_q, query=True)
    km = pad_meta(k_meta, -(-lk // block_k) * block_k, query=False)
    return jnp.stack(qm, axis=1), jnp.stack(km, axis=1), build(qm, km, block_q, block_k)


def block_share(q_meta: TokenMeta, k_meta: TokenMeta, block_q: int, block_k: int) -> dict:
    """Counts for reports: tiles computed, all tiles, tiles a plain causal mask would keep.

    Takes unpadded metadata [B, L]; "causal" is the block-causal count on storage order
    (tile (i, j) kept when some key index <= some query index, i.e. j*bk <= i*bq + bq - 1)
    restricted to real (unpadded) tokens.
    """
    lq, lk = q_meta.doc_id.shape[1], k_meta.doc_id.shape[1]
    nq, nk = -(-lq // block_q), -(-lk // block_k)
    qp, kp = pad_meta(q_meta, nq * block_q, query=True), pad_meta(k_meta, nk * block_k, query=False)
    mask = block_mask(qp, kp, block_q, block_k)
    i, j = jnp.arange(nq)[:, None], jnp.arange(nk)[None, :]
    causal = j * block_k <= i * block_q + block_q - 1
    b = q_meta.doc_id.shape[0]
    return dict(computed=int(mask.sum()), total=b * nq * nk, causal=b * int(causal.sum()))
