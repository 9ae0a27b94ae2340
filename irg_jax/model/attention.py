"""Packed attention whose mask is computed blockwise from per-token metadata.

Every query and key token carries :class:`TokenMeta` (document id, split id, split mode,
logical sequence position). The rule of spec §2.5, evaluated on logical positions:

    allowed(q, k) = same_doc(q, k)
                    and (pos(k) <= pos(q) or (same_split(q, k) and mode(q) != CAUSAL))
                    and not (mode(k) == NOISE and not same_split(q, k))

The same rule serves the KV cache: cached keys sit at earlier positions of document 0,
empty cache slots belong to no query's document (``INVALID_DOC``), which gives the
bottom-right causal alignment of new text against the cache.

Implementations are registered by name (``config.model.attention.impl``) and share the
signature ``fn(q, k, v, q_meta, k_meta, *, block_q, block_k) -> out``:
``q [B, Lq, Hq, D]``, ``k, v [B, Lk, Hk, D]`` (``Hq`` a multiple of ``Hk``: GQA), metadata
arrays ``[B, Lq]`` / ``[B, Lk]``, output ``[B, Lq, Hq, D]`` in ``q.dtype``.

* ``chunked``: flash-style; query blocks x key blocks with an online softmax, a custom
  VJP that recomputes probabilities blockwise; each query block loops over its own list of
  key blocks with an allowed pair, per pack. Memory is O(block_q x L); no L x L array exists.
* ``dense``: materialises the full mask; a reference for tests and tiny inputs.
* ``pallas_tpu`` / ``pallas_gpu``: Pallas kernels (``irg_jax.model.kernels``) that visit only
  the (query, key) blocks with an allowed pair, from per-block lists derived from the metadata.
* ``auto`` (the default): ``pallas_tpu`` on TPU, ``pallas_gpu`` on GPU, ``chunked`` on CPU.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from irg_jax.data.packed_batch import CAUSAL, NOISE
from irg_jax.parallel import sharding

INVALID_DOC = -1  # keys in no document: empty cache slots, block padding
_PAD_QUERY_DOC = -2  # query block padding (attends to nothing)
_NEG = -1e30


class TokenMeta(NamedTuple):
    """Per-token attention metadata, each int32 [B, L]."""

    doc_id: jax.Array
    split_id: jax.Array
    split_mode: jax.Array
    seq_pos: jax.Array

    @staticmethod
    def concat(metas: list["TokenMeta"]) -> "TokenMeta":
        return TokenMeta(*(jnp.concatenate(f, axis=1) for f in zip(*metas)))


def mask_rule(qd, qs, qm, qp, kd, ks, km, kp):
    """The rule of spec §2.5 on broadcastable query fields (doc, split, mode, pos) and key fields.

    Shared by :func:`allowed_mask` and the Pallas kernels (``irg_jax.model.kernels``), which
    evaluate it inside a (query block, key block) tile.
    """
    same_split = qs == ks
    visible = (kp <= qp) | (same_split & (qm != CAUSAL))
    return (qd == kd) & visible & ~((km == NOISE) & ~same_split)


def allowed_mask(q: TokenMeta, k: TokenMeta) -> jax.Array:
    """bool [B, Lq, Lk]: may query i attend to key j (spec §2.5 on logical positions)."""
    return mask_rule(*(a[:, :, None] for a in q), *(a[:, None, :] for a in k))


AttentionFn = Callable[..., jax.Array]
_REGISTRY: dict[str, AttentionFn] = {}


def register(name: str) -> Callable[[AttentionFn], AttentionFn]:
    """Decorator: make ``fn`` available as ``config.model.attention.impl = name``."""

    def deco(fn: AttentionFn) -> AttentionFn:
        _REGISTRY[name] = fn
        return fn

    return deco


def names() -> list[str]:
    """The registered impl names (valid values of ``model.attention.impl``)."""
    return sorted(_REGISTRY)


def get(name: str) -> AttentionFn:
    if name not in _REGISTRY:
        raise ValueError(f"model.attention.impl={name!r}: unknown; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def attend(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, attn_cfg) -> jax.Array:
    """Dispatch on ``attn_cfg.impl`` (a ``model.attention`` ConfigDict), one call per device.

    On a mesh, every impl runs inside ``shard_map`` on the device's own packs (the ``batch``
    rule) and kv-head groups (the ``kv_heads`` rule, used for the query heads too so that a GQA
    group stays on one device), with whole sequences: packs are independent, so the call needs
    no collective. This is what lets ``chunked`` loop over each pack's own tile list (trip
    counts differ between devices) and what a Pallas kernel, which the SPMD partitioner cannot
    split, needs on a pod.
    """
    fn = get(attn_cfg.impl)
    heads = "kv_heads" if sharding.splits("kv_heads", k.shape[2]) else None
    x_names, m_names = ("batch", None, heads, None), TokenMeta(*[("batch", None)] * 4)

    def local(q, k, v, q_meta, k_meta):
        return fn(q, k, v, q_meta, k_meta, block_q=attn_cfg.block_q, block_k=attn_cfg.block_k)

    return sharding.per_device(local, (q, k, v, q_meta, k_meta), (x_names, x_names, x_names, m_names, m_names),
                               x_names)


def _check_shapes(q, k, v):
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} are not [B, L, H, D] compatible")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")


@register("dense")
def dense_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q: int = 0, block_k: int = 0):
    """Reference: full scores and the full boolean mask (tiny inputs only)."""
    del block_q, block_k
    _check_shapes(q, k, v)
    b, lq, hq, d = q.shape
    hk = k.shape[2]
    qg = q.reshape(b, lq, hk, hq // hk, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * d ** -0.5
    mask = allowed_mask(q_meta, k_meta)[:, None, None]
    s = jnp.where(mask, s, _NEG)
    p = jnp.exp(s - s.max(-1, keepdims=True)) * mask
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, lq, hq, d).astype(q.dtype)


# ---------------------------------------------------------------- chunked (flash-style)

def _pad_to(x: jax.Array, axis: int, size: int, value) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x: jax.Array, n: int) -> jax.Array:
    """[B, n*blk, ...] -> [n, B, blk, ...]."""
    return jnp.moveaxis(x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:]), 1, 0)


def _unblocks(x: jax.Array) -> jax.Array:
    """[n, B, blk, ...] -> [B, n*blk, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _meta_blocks(m: TokenMeta, n: int, size: int, pad_doc: int) -> TokenMeta:
    fill = (pad_doc, -1, CAUSAL, 2**30)
    return TokenMeta(*(_blocks(_pad_to(a, 1, size, f), n) for a, f in zip(m, fill)))


def _block_scores(qb, kb, mask):
    """Scaled scores [B, Hk, G, bq, bk] in fp32, masked to _NEG; mask [B, 1, 1, bq, bk]."""
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qb, kb, preferred_element_type=jnp.float32) * qb.shape[-1] ** -0.5
    return jnp.where(mask, s, _NEG)


def online_softmax_block(carry, qb, kb, vb, mask):
    """One key block of an online softmax: carry (max, sum, acc) [B, Hk, G, bq(, D)] in fp32.

    ``qb [B, bq, Hk, G, D]``, ``kb/vb [B, bk, Hk, D]``, ``mask [B, 1, 1, bq, bk]``.
    """
    return online_softmax_update(carry, _block_scores(qb, kb, mask), mask, vb, "bhgqk,bkhd->bhgqd")


def online_softmax_update(carry, s, mask, vb, pv_spec: str):
    """Fold one tile's masked scores ``s [B, Hk, G, bq, bk]`` into the online softmax carry
    (max, sum, acc); ``pv_spec`` is the einsum of the probabilities with the values ``vb``."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    acc = acc * corr[..., None] + jnp.einsum(pv_spec, p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
    return m_new, l * corr + p.sum(-1), acc


def _tie_metadata(q, qm, km):
    """Make the block masks depend on q, so that they are computed block by block.

    The masks depend only on the token metadata. Under ``jax.checkpoint`` (remat) and inside
    the layer scan, JAX treats such values as known in the forward pass and hoists them out
    of the loops as residuals: all nq x nk block masks (and the masked score constants) are
    materialised and saved for the backward pass, O(L^2) memory (212 GiB for one 45k-token
    pack of the 7B model). An optimization barrier over (q, metadata) ties them to the
    differentiated input, so they stay inside the loops.
    """
    return jax.lax.optimization_barrier((q, qm, km))


def _take(blocks, j):
    """Block ``j[b]`` of pack b, for a blocked array [n, B, blk, ...] or blocked metadata -> [B, blk, ...]."""
    if isinstance(blocks, TokenMeta):
        return TokenMeta(*(_take(a, j) for a in blocks))
    return blocks[j, jnp.arange(j.shape[0])]


def _hm_scores(qb, kb, mask):
    """Head-major tile scores [B, Hk, G, bq, bk] in fp32, masked to _NEG; mask [B, 1, 1, bq, bk]."""
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qb, kb, preferred_element_type=jnp.float32) * qb.shape[-1] ** -0.5
    return jnp.where(mask, s, _NEG)


def _flash_forward(q, k, v, qm, km, k_idx, k_count):
    """q [nq, B, Hk, G, bq, D], k/v [nk, B, Hk, bk, D] -> out like q, lse [nq, B, Hk, G, bq].

    Head-major blocks, so that every tile product is a batched matmul over (pack, kv head) with
    no per-tile transposes. Step t of query block i attends pack b's queries to its key block
    ``k_idx[i, b, t]``, the t-th of the ``k_count[i, b]`` key blocks with an allowed pair for that
    pack (ascending; steps past a pack's count are masked out for it): each pack computes only
    its own tiles, and every step still works on all packs at once. Skipping the other tiles is
    exact (an all-masked tile leaves the online softmax unchanged). Demo stage-1 step
    (bench/demo_images.py, same process, alternating): 0.608 -> 0.505 s against one
    ``lax.cond`` per tile that skipped a tile only when it was empty in every pack.
    """
    q, qm, km = _tie_metadata(q, qm, km)
    nq, b, hk, g, bq, d = q.shape

    def q_block(args):
        qb, qmb, idx, count = args

        def k_block(t, carry):
            j = idx[:, t]
            mask = (allowed_mask(qmb, _take(km, j)) & (t < count)[:, None, None])[:, None, None]
            return online_softmax_update(carry, _hm_scores(qb, _take(k, j), mask), mask, _take(v, j),
                                         "bhgqk,bhkd->bhgqd")

        # *_like(qb): the carries vary over the devices like qb does (inside shard_map)
        init = (jnp.full_like(qb[..., 0], _NEG, jnp.float32), jnp.zeros_like(qb[..., 0], jnp.float32),
                jnp.zeros_like(qb, jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, jnp.max(count), k_block, init)
        safe_l = jnp.where(l > 0, l, 1.0)
        out = acc / safe_l[..., None]
        lse = jnp.where(l > 0, m + jnp.log(safe_l), _NEG)
        return out.astype(qb.dtype), lse  # out [B, Hk, G, bq, D]

    return jax.lax.map(q_block, (q, qm, k_idx, k_count))


def _flash_backward(q, k, v, qm, km, k_idx, k_count, out, lse, dout):
    """Gradients for q, k, v (blocked layouts as in _flash_forward; the same tiles visited)."""
    q, qm, km = _tie_metadata(q, qm, km)
    delta = jnp.einsum("nbhgqd,nbhgqd->nbhgq", dout.astype(jnp.float32), out.astype(jnp.float32))
    packs = jnp.arange(q.shape[1])

    def q_block(dkv, args):
        qb, qmb, dob, lseb, deltab, idx, count = args

        def k_block(t, carry):
            dq, dk_all, dv_all = carry
            j = idx[:, t]
            kb, vb = _take(k, j), _take(v, j)
            mask = (allowed_mask(qmb, _take(km, j)) & (t < count)[:, None, None])[:, None, None]
            p = jnp.where(mask, jnp.exp(_hm_scores(qb, kb, mask) - lseb[..., None]), 0.0)
            dv = jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(dob.dtype), dob, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bhgqd,bhkd->bhgqk", dob, vb, preferred_element_type=jnp.float32)
            ds = (p * (dp - deltab[..., None]) * qb.shape[-1] ** -0.5).astype(qb.dtype)
            dq = dq + jnp.einsum("bhgqk,bhkd->bhgqd", ds, kb, preferred_element_type=jnp.float32)
            dk = jnp.einsum("bhgqk,bhgqd->bhkd", ds, qb, preferred_element_type=jnp.float32)
            # a pack past its count repeats its last block with zero gradients: adding them is exact
            return dq, dk_all.at[j, packs].add(dk), dv_all.at[j, packs].add(dv)

        dq, dk_all, dv_all = jax.lax.fori_loop(0, jnp.max(count), k_block, (jnp.zeros_like(qb, jnp.float32), *dkv))
        return (dk_all, dv_all), dq

    zeros = jnp.zeros_like(k, jnp.float32)
    (dk, dv), dq = jax.lax.scan(q_block, (zeros, zeros), (q, qm, dout, lse, delta, k_idx, k_count))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@jax.custom_vjp
def _flash(q, k, v, qm, km, k_idx, k_count):
    """Softmax(q k^T / sqrt(D)) v under the metadata mask; blocked layouts as in _flash_forward."""
    return _flash_forward(q, k, v, qm, km, k_idx, k_count)[0]


def _flash_fwd(q, k, v, qm, km, k_idx, k_count):
    out, lse = _flash_forward(q, k, v, qm, km, k_idx, k_count)
    return out, (q, k, v, qm, km, k_idx, k_count, out, lse)


def _flash_bwd(res, dout):
    q, k, v, qm, km, k_idx, k_count, out, lse = res
    dq, dk, dv = _flash_backward(q, k, v, qm, km, k_idx, k_count, out, lse, dout)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _tile_lists(qm: TokenMeta, km: TokenMeta):
    """Blocked metadata -> (int32 [nq, B, nk]: per query block and pack, the key blocks with an
    allowed pair, ascending, first; int32 [nq, B]: their counts). Exact, one query block at a
    time (O(B x block_q x Lk) live values)."""
    from irg_jax.model.kernels import block_lists  # imports this module

    k_fields = tuple(_unblocks(a)[:, None, :] for a in km)  # [B, 1, Lk]
    nk, b, bk = km.doc_id.shape

    def one_query_block(qmb: TokenMeta) -> jax.Array:
        tile = mask_rule(*(a[:, :, None] for a in qmb), *k_fields)  # [B, bq, Lk]
        return tile.reshape(b, -1, nk, bk).any(axis=(1, 3))  # [B, nk]

    return block_lists.lists_from_mask(jax.lax.map(one_query_block, qm))


@register("chunked")
def chunked_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q: int = 512, block_k: int = 512):
    """Flash-style blockwise attention; the mask of each (query, key) block comes from metadata."""
    _check_shapes(q, k, v)
    b, lq, hq, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    bq, bk = min(block_q, lq), min(block_k, lk)
    nq, nk = -(-lq // bq), -(-lk // bk)
    # head-major blocks: q [nq, B, Hk, G, bq, D], k/v [nk, B, Hk, bk, D]
    qg = jnp.moveaxis(_blocks(_pad_to(q, 1, nq * bq, 0).reshape(b, nq * bq, hk, hq // hk, d), nq), 2, 4)
    kb = jnp.moveaxis(_blocks(_pad_to(k, 1, nk * bk, 0), nk), 2, 3)
    vb = jnp.moveaxis(_blocks(_pad_to(v, 1, nk * bk, 0), nk), 2, 3)
    qm = _meta_blocks(q_meta, nq, nq * bq, _PAD_QUERY_DOC)
    km = _meta_blocks(k_meta, nk, nk * bk, INVALID_DOC)
    k_idx, k_count = _tile_lists(qm, km)
    out = jnp.moveaxis(_flash(qg, kb, vb, qm, km, k_idx, k_count), 4, 2)
    return _unblocks(out)[:, :lq].reshape(b, lq, hq, d)


# ---------------------------------------------------------------- Pallas kernels and "auto"

@register("pallas_tpu")
def pallas_tpu_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q: int = 128, block_k: int = 128):
    """Mosaic TPU kernels with scalar-prefetched block lists (Pallas interpreter off TPU: slow)."""
    from irg_jax.model.kernels import pallas_tpu
    return pallas_tpu.attention(q, k, v, q_meta, k_meta, block_q=block_q, block_k=block_k)


@register("pallas_gpu")
def pallas_gpu_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q: int = 128, block_k: int = 128):
    """Triton GPU kernels looping over the block lists (Pallas interpreter off GPU: slow)."""
    from irg_jax.model.kernels import pallas_gpu
    return pallas_gpu.attention(q, k, v, q_meta, k_meta, block_q=block_q, block_k=block_k)


AUTO_BY_BACKEND = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}  # anything else (CPU): "chunked"


def resolve(name: str) -> str:
    """The impl ``name`` stands for: ``auto`` picks by ``jax.default_backend()`` (at trace time)."""
    return AUTO_BY_BACKEND.get(jax.default_backend(), "chunked") if name == "auto" else name


@register("auto")
def auto_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q: int = 512, block_k: int = 512):
    """``pallas_tpu`` on TPU, ``pallas_gpu`` on GPU, ``chunked`` elsewhere."""
    return get(resolve("auto"))(q, k, v, q_meta, k_meta, block_q=block_q, block_k=block_k)
