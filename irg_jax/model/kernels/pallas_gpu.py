"""Packed attention as Pallas GPU (Triton lowering) kernels: forward, dQ and dK/dV.

Same contract as :mod:`irg_jax.model.kernels.pallas_tpu` and the other impls of
``irg_jax.model.attention`` (``q [B, Lq, Hq, D]``, ``k, v [B, Lk, Hk, D]``, metadata, output like
``q``). The tensors keep their ``[B, L, H, D]`` layout (Triton tiles are strided pointers).

* One program per (batch row, query head, query block) for the forward and dQ passes; it loops
  over the key blocks of its list (:mod:`~irg_jax.model.kernels.block_lists`) with the count as
  the trip count, so fully masked tiles cost nothing. The dK/dV pass has one program per
  (batch row, query head, key block) looping over the transposed list; the ``G = Hq / Hk``
  per-query-head partial dK/dV are summed per key head afterwards (no atomics).
* In a visited tile the mask is the exact rule (:func:`attention.mask_rule`) on the tile's
  metadata; softmax statistics and accumulators in fp32; queries with no visible key give 0.
* Triton wants power-of-two tiles of at least 16: block sizes must be powers of two (they are
  clamped to the next power of two of the lengths) and ``D`` is zero-padded to one (the scale keeps the true ``D``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from irg_jax.model.attention import TokenMeta, _check_shapes, mask_rule
from irg_jax.model.kernels import block_lists, kernel_vjp

_NEG = -1e30
_F32 = jnp.float32
_MIN_TILE = 16


def use_interpret(interpret: bool | None) -> bool:
    """``None``: interpret unless the default backend is a GPU."""
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


def _dot(a, b, *, trans_a=False, trans_b=False):
    exact = a.dtype == jnp.float32  # fp32 inputs: no TF32 rounding
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=not exact).astype(_F32)


def _row_fields(ref, start, size):
    """Metadata [4, L] ref -> the four fields of tokens [start, start + size) as rows [1, size]."""
    return tuple(ref[f, pl.ds(start, size)][None, :] for f in range(4))


def _col_fields(ref, start, size):
    return tuple(ref[f, pl.ds(start, size)][:, None] for f in range(4))


# ---------------------------------------------------------------- kernels

def _fwd_kernel(q_ref, k_ref, v_ref, qm_ref, km_ref, idx_ref, cnt_ref, o_ref, lse_ref, *, scale, bq, bk):
    q = q_ref[...]
    qf = _col_fields(qm_ref, 0, bq)

    def step(t, carry):
        m, l, acc = carry
        start = pl.multiple_of(idx_ref[t] * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        mask = mask_rule(*qf, *_row_fields(km_ref, start, bk))  # [bq, bk]
        s = jnp.where(mask, _dot(q, k, trans_b=True) * scale, _NEG)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        corr = jnp.exp(m - m_new)
        acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v)
        return m_new, l * corr + p.sum(axis=-1), acc

    init = (jnp.full((bq,), _NEG, _F32), jnp.zeros((bq,), _F32), jnp.zeros(q.shape, _F32))
    m, l, acc = jax.lax.fori_loop(0, cnt_ref[0], step, init)
    safe = jnp.where(l > 0, l, 1.0)
    o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0, m + jnp.log(safe), _NEG)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qm_ref, km_ref, idx_ref, cnt_ref, dq_ref,
               *, scale, bq, bk):
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], dl_ref[...][:, None]
    qf = _col_fields(qm_ref, 0, bq)

    def step(t, acc):
        start = pl.multiple_of(idx_ref[t] * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        mask = mask_rule(*qf, *_row_fields(km_ref, start, bk))
        p = jnp.where(mask, jnp.exp(_dot(q, k, trans_b=True) * scale - lse), 0.0)
        ds = p * (_dot(do, v, trans_b=True) - delta) * scale
        return acc + _dot(ds.astype(k.dtype), k)

    acc = jax.lax.fori_loop(0, cnt_ref[0], step, jnp.zeros(q.shape, _F32))
    dq_ref[...] = acc.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, do_ref, lse_ref, dl_ref, qm_ref, k_ref, v_ref, km_ref, idx_ref, cnt_ref, dk_ref, dv_ref,
                *, scale, bq, bk):
    """Transposed tiles: key rows, query columns ([bk, bq])."""
    k, v = k_ref[...], v_ref[...]
    kf = _col_fields(km_ref, 0, bk)

    def step(t, carry):
        dk, dv = carry
        start = pl.multiple_of(idx_ref[t] * bq, bq)
        q = q_ref[pl.ds(start, bq), :]
        do = do_ref[pl.ds(start, bq), :]
        lse = lse_ref[pl.ds(start, bq)][None, :]
        delta = dl_ref[pl.ds(start, bq)][None, :]
        mask = mask_rule(*_row_fields(qm_ref, start, bq), *kf)  # [bk, bq]
        p = jnp.where(mask, jnp.exp(_dot(k, q, trans_b=True) * scale - lse), 0.0)
        dv = dv + _dot(p.astype(do.dtype), do)
        ds = p * (_dot(v, do, trans_b=True) - delta) * scale
        return dk + _dot(ds.astype(q.dtype), q), dv

    zeros = jnp.zeros(k.shape, _F32)
    dk, dv = jax.lax.fori_loop(0, cnt_ref[0], step, (zeros, zeros))
    dk_ref[...] = dk
    dv_ref[...] = dv


# ---------------------------------------------------------------- pallas_call wrappers

def _params():
    return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _forward(cfg, q, k, v, qm_rows, km_rows, lists):
    """q [B, Lq, Hq, D], k/v [B, Lk, Hk, D] (padded) -> out like q, lse [B, Hq, Lq] fp32."""
    bq, bk, interpret, d_true = cfg
    b, lq, hq, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    grp = hq // hk
    nk = lk // bk
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=d_true ** -0.5, bq=bq, bk=bk),
        grid=(b, hq, lq // bq),
        in_specs=[pl.BlockSpec((None, bq, None, d), lambda bi, h, i: (bi, i, h, 0)),
                  pl.BlockSpec((None, lk, None, d), lambda bi, h, i: (bi, 0, h // grp, 0)),
                  pl.BlockSpec((None, lk, None, d), lambda bi, h, i: (bi, 0, h // grp, 0)),
                  pl.BlockSpec((None, 4, bq), lambda bi, h, i: (bi, 0, i)),
                  pl.BlockSpec((None, 4, lk), lambda bi, h, i: (bi, 0, 0)),
                  pl.BlockSpec((None, None, nk), lambda bi, h, i: (bi, i, 0)),
                  pl.BlockSpec((None, None, 1), lambda bi, h, i: (bi, i, 0))],
        out_specs=[pl.BlockSpec((None, bq, None, d), lambda bi, h, i: (bi, i, h, 0)),
                   pl.BlockSpec((None, None, bq), lambda bi, h, i: (bi, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, lq), _F32)],
        compiler_params=_params(), interpret=interpret, name="irg_attention_fwd_gpu",
    )(q, k, v, qm_rows, km_rows, lists.q_idx, lists.q_count[..., None])
    return out, lse


def _backward(cfg, q, k, v, qm_rows, km_rows, lists, out, lse, dout):
    bq, bk, interpret, d_true = cfg
    b, lq, hq, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    grp = hq // hk
    nq, nk = lq // bq, lk // bk
    scale = d_true ** -0.5
    delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(_F32), out.astype(_F32))  # [B, Hq, Lq]
    q_spec = pl.BlockSpec((None, bq, None, d), lambda bi, h, i: (bi, i, h, 0))
    kv_full = pl.BlockSpec((None, lk, None, d), lambda bi, h, i: (bi, 0, h // grp, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda bi, h, i: (bi, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, bq=bq, bk=bk),
        grid=(b, hq, nq),
        in_specs=[q_spec, kv_full, kv_full, q_spec, row_spec, row_spec,
                  pl.BlockSpec((None, 4, bq), lambda bi, h, i: (bi, 0, i)),
                  pl.BlockSpec((None, 4, lk), lambda bi, h, i: (bi, 0, 0)),
                  pl.BlockSpec((None, None, nk), lambda bi, h, i: (bi, i, 0)),
                  pl.BlockSpec((None, None, 1), lambda bi, h, i: (bi, i, 0))],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(), interpret=interpret, name="irg_attention_dq_gpu",
    )(q, k, v, dout, lse, delta, qm_rows, km_rows, lists.q_idx, lists.q_count[..., None])

    q_full = pl.BlockSpec((None, lq, None, d), lambda bi, h, j: (bi, 0, h, 0))
    row_full = pl.BlockSpec((None, None, lq), lambda bi, h, j: (bi, h, 0))
    kv_block = pl.BlockSpec((None, bk, None, d), lambda bi, h, j: (bi, j, h // grp, 0))
    part = pl.BlockSpec((None, bk, None, d), lambda bi, h, j: (bi, j, h, 0))
    part_shape = jax.ShapeDtypeStruct((b, lk, hq, d), _F32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, bq=bq, bk=bk),
        grid=(b, hq, nk),
        in_specs=[q_full, q_full, row_full, row_full,
                  pl.BlockSpec((None, 4, lq), lambda bi, h, j: (bi, 0, 0)),
                  kv_block, kv_block,
                  pl.BlockSpec((None, 4, bk), lambda bi, h, j: (bi, 0, j)),
                  pl.BlockSpec((None, None, nq), lambda bi, h, j: (bi, j, 0)),
                  pl.BlockSpec((None, None, 1), lambda bi, h, j: (bi, j, 0))],
        out_specs=[part, part], out_shape=[part_shape, part_shape],
        compiler_params=_params(), interpret=interpret, name="irg_attention_dkv_gpu",
    )(q, dout, lse, delta, qm_rows, k, v, km_rows, lists.k_idx, lists.k_count[..., None])
    dk = dk.reshape(b, lk, hk, grp, d).sum(3).astype(k.dtype)  # the G query heads of a key head
    dv = dv.reshape(b, lk, hk, grp, d).sum(3).astype(v.dtype)
    return dq, dk, dv


_attend = kernel_vjp.kernel_attention(_forward, _backward)


# ---------------------------------------------------------------- entry point

def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _check_block(name: str, value: int) -> None:
    if value < _MIN_TILE or value & (value - 1):
        raise ValueError(f"model.attention.{name}={value}: pallas_gpu needs a power of two >= {_MIN_TILE}")


def attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q: int = 128, block_k: int = 128,
              interpret: bool | None = None) -> jax.Array:
    """Packed attention under the metadata mask on GPU (``interpret``: Pallas interpreter)."""
    _check_shapes(q, k, v)
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    b, lq, hq, d = q.shape
    lk = k.shape[1]
    bq = min(block_q, max(_next_pow2(lq), _MIN_TILE))
    bk = min(block_k, max(_next_pow2(lk), _MIN_TILE))
    qm_rows, km_rows, lists = block_lists.prepare(q_meta, k_meta, lq, lk, bq, bk)
    lq_pad, lk_pad = qm_rows.shape[-1], km_rows.shape[-1]
    dp = max(_next_pow2(d), _MIN_TILE)

    def pad(x, size):
        return jnp.pad(x, ((0, 0), (0, size - x.shape[1]), (0, 0), (0, dp - d)))

    cfg = (bq, bk, use_interpret(interpret), d)  # the scale uses the true head dim
    out = _attend(cfg, pad(q, lq_pad), pad(k, lk_pad), pad(v, lk_pad), qm_rows, km_rows, lists)
    return out[:, :lq, :, :d]
