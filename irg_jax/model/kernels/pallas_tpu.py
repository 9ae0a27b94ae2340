"""Packed attention as Pallas TPU (Mosaic) kernels: forward, dQ and dK/dV.

Contract of ``irg_jax.model.attention`` impls: ``q [B, Lq, Hq, D]``, ``k, v [B, Lk, Hk, D]``
(``Hq`` a multiple of ``Hk``), :class:`TokenMeta` for queries and keys, output like ``q``.

* Layout: heads are moved before the sequence (``[B, H, L, D]``) so a tile is ``(block, D)``.
* Block skipping: :mod:`irg_jax.model.kernels.block_lists` gives, per query block, the key
  blocks with an allowed pair and their count. Both are scalar-prefetched
  (``PrefetchScalarGridSpec``): the key/value index maps read the list, and the grid steps past
  the count compute nothing and ask for the block already in VMEM (no copy). The dK/dV pass
  walks the transposed lists (per key block, the query blocks that see it).
* Inside a visited tile the mask is the exact rule (:func:`attention.mask_rule`) on the tile's
  metadata: queries as columns ``[bq, 4]``, keys as rows ``[4, bk]`` (transposed for dK/dV).
* Softmax statistics in fp32; the row max and sum live in ``[bq, 128]`` scratch (lane-replicated,
  the TPU layout for per-row values). The log-sum-exp leaves the forward pass lane-replicated and
  is kept as ``[B, Hq, Lq]`` for the backward pass, where it enters as a row ``[1, bq]``.
* Padding: lengths are padded to block multiples; padded queries see nothing (output 0),
  padded keys are seen by none. A query with no visible key gets output 0, as in ``dense``.
* GQA: the key/value index maps divide the query head by ``G = Hq / Hk``; dK/dV accumulate over
  the ``G`` query heads of a key head and over the listed query blocks in VMEM scratch.

On hardware ``block_q``/``block_k`` should be multiples of 128 (or the whole padded length)
and ``D`` a multiple of 128; the scalar-prefetched lists take ``2 * B * nq * nk`` int32 of SMEM.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from irg_jax.model.attention import TokenMeta, _check_shapes, mask_rule
from irg_jax.model.kernels import block_lists, kernel_vjp

_NEG = -1e30
_LANES = 128
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_F32 = jnp.float32


def use_interpret(interpret: bool | None) -> bool:
    """``None``: interpret unless the default backend is a TPU."""
    return jax.default_backend() != "tpu" if interpret is None else bool(interpret)


def _dot(a, b, dims):
    return jax.lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _cols(ref):
    """Metadata tile [n, 4] -> the four fields as columns [n, 1]."""
    m = ref[...]
    return tuple(m[:, f:f + 1] for f in range(4))


def _rows(ref):
    """Metadata tile [4, n] -> the four fields as rows [1, n]."""
    m = ref[...]
    return tuple(m[f:f + 1, :] for f in range(4))


# ---------------------------------------------------------------- kernels

def _fwd_kernel(q_idx, q_cnt, q_ref, k_ref, v_ref, qm_ref, km_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc,
                *, scale):
    del q_idx
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, _F32)
        l_sc[...] = jnp.zeros(l_sc.shape, _F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

    @pl.when(j < q_cnt[b, i])
    def _tile():
        mask = mask_rule(*_cols(qm_ref), *_rows(km_ref))  # [bq, bk]
        s = jnp.where(mask, _dot(q_ref[...], k_ref[...], _NT) * scale, _NEG)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))  # [bq, LANES]
        p = jnp.where(mask, jnp.exp(s - m_new[:, :1]), 0.0)
        corr = jnp.exp(m_prev - m_new)
        l_sc[...] = l_sc[...] * corr + p.sum(axis=-1, keepdims=True)
        m_sc[...] = m_new
        v = v_ref[...]
        acc_sc[...] = acc_sc[...] * corr[:, :1] + _dot(p.astype(v.dtype), v, _NN)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_sc[...]
        safe = jnp.where(l > 0, l, 1.0)
        o_ref[...] = (acc_sc[...] / safe[:, :1]).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(l > 0, m_sc[...] + jnp.log(safe), _NEG)


def _dq_kernel(q_idx, q_cnt, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qm_ref, km_ref, dq_ref, acc_sc,
               *, scale):
    del q_idx
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

    @pl.when(j < q_cnt[b, i])
    def _tile():
        mask = mask_rule(*_cols(qm_ref), *_rows(km_ref))  # [bq, bk]
        k = k_ref[...]
        s = _dot(q_ref[...], k, _NT) * scale
        p = jnp.where(mask, jnp.exp(s - lse_ref[0][:, None]), 0.0)
        dp = _dot(do_ref[...], v_ref[...], _NT)
        ds = p * (dp - dl_ref[0][:, None]) * scale
        acc_sc[...] += _dot(ds.astype(k.dtype), k, _NN)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = acc_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(k_idx, k_cnt, q_ref, do_ref, lse_ref, dl_ref, qm_ref, k_ref, v_ref, km_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, scale):
    """Transposed tile: key rows, query columns ([bk, bq]); no in-kernel transposes."""
    del k_idx
    b, kj, g, t = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (t == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)

    @pl.when(t < k_cnt[b, kj])
    def _tile():
        mask = mask_rule(*_rows(qm_ref), *_cols(km_ref))  # [bk, bq]
        q, do = q_ref[...], do_ref[...]
        s = _dot(k_ref[...], q, _NT) * scale
        p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
        dv_sc[...] += _dot(p.astype(do.dtype), do, _NN)
        dp = _dot(v_ref[...], do, _NT)
        ds = p * (dp - dl_ref[...]) * scale
        dk_sc[...] += _dot(ds.astype(q.dtype), q, _NN)

    @pl.when((g == pl.num_programs(3) - 1) & (t == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ---------------------------------------------------------------- pallas_call wrappers

def _params(n_parallel: int, n_arbitrary: int):
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary)


def _forward(cfg, q, k, v, qm_rows, km_rows, lists):
    """q [B, Hq, Lq, D], k/v [B, Hk, Lk, D] (padded) -> out like q, lse [B, Hq, Lq] fp32."""
    bq, bk, interpret = cfg
    b, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    grp = hq // hk

    def q_map(bi, h, i, j, idx, cnt):
        return bi, h, i, 0

    def kv_map(bi, h, i, j, idx, cnt):
        return bi, h // grp, idx[bi, i, j], 0

    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, hq, lq // bq, lk // bk),
        in_specs=[pl.BlockSpec((None, None, bq, d), q_map),
                  pl.BlockSpec((None, None, bk, d), kv_map),
                  pl.BlockSpec((None, None, bk, d), kv_map),
                  pl.BlockSpec((None, bq, 4), lambda bi, h, i, j, idx, cnt: (bi, i, 0)),
                  pl.BlockSpec((None, 4, bk), lambda bi, h, i, j, idx, cnt: (bi, 0, idx[bi, i, j]))],
        out_specs=[pl.BlockSpec((None, None, bq, d), q_map),
                   pl.BlockSpec((None, None, bq, _LANES), q_map)],
        scratch_shapes=[pltpu.VMEM((bq, _LANES), _F32), pltpu.VMEM((bq, _LANES), _F32),
                        pltpu.VMEM((bq, d), _F32)])
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=d ** -0.5), grid_spec=spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, lq, _LANES), _F32)],
        compiler_params=_params(3, 1), interpret=interpret, name="irg_attention_fwd",
    )(lists.q_idx, lists.q_count, q, k, v, jnp.swapaxes(qm_rows, 1, 2), km_rows)
    return out, lse[..., 0]


def _backward(cfg, q, k, v, qm_rows, km_rows, lists, out, lse, dout):
    bq, bk, interpret = cfg
    b, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    grp = hq // hk
    nq, nk = lq // bq, lk // bk
    scale = d ** -0.5
    delta = jnp.einsum("bhqd,bhqd->bhq", dout.astype(_F32), out.astype(_F32))[:, :, None]  # [B, Hq, 1, Lq]
    lse = lse[:, :, None]

    # dQ: the forward's grid and lists.
    def q_map(bi, h, i, j, idx, cnt):
        return bi, h, i, 0

    def kv_map(bi, h, i, j, idx, cnt):
        return bi, h // grp, idx[bi, i, j], 0

    def row_map(bi, h, i, j, idx, cnt):
        return bi, h, 0, i

    dq_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, hq, nq, nk),
        in_specs=[pl.BlockSpec((None, None, bq, d), q_map),
                  pl.BlockSpec((None, None, bk, d), kv_map),
                  pl.BlockSpec((None, None, bk, d), kv_map),
                  pl.BlockSpec((None, None, bq, d), q_map),
                  pl.BlockSpec((None, None, 1, bq), row_map),
                  pl.BlockSpec((None, None, 1, bq), row_map),
                  pl.BlockSpec((None, bq, 4), lambda bi, h, i, j, idx, cnt: (bi, i, 0)),
                  pl.BlockSpec((None, 4, bk), lambda bi, h, i, j, idx, cnt: (bi, 0, idx[bi, i, j]))],
        out_specs=pl.BlockSpec((None, None, bq, d), q_map),
        scratch_shapes=[pltpu.VMEM((bq, d), _F32)])
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale), grid_spec=dq_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(3, 1), interpret=interpret, name="irg_attention_dq",
    )(lists.q_idx, lists.q_count, q, k, v, dout, lse, delta, jnp.swapaxes(qm_rows, 1, 2), km_rows)

    # dK, dV: per key block, the G query heads of its key head x the listed query blocks.
    def qt_map(bi, h, kj, g, t, idx, cnt):
        return bi, h * grp + g, idx[bi, kj, t], 0

    def rowt_map(bi, h, kj, g, t, idx, cnt):
        return bi, h * grp + g, 0, idx[bi, kj, t]

    def k_map(bi, h, kj, g, t, idx, cnt):
        return bi, h, kj, 0

    dkv_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, hk, nk, grp, nq),
        in_specs=[pl.BlockSpec((None, None, bq, d), qt_map),
                  pl.BlockSpec((None, None, bq, d), qt_map),
                  pl.BlockSpec((None, None, 1, bq), rowt_map),
                  pl.BlockSpec((None, None, 1, bq), rowt_map),
                  pl.BlockSpec((None, 4, bq), lambda bi, h, kj, g, t, idx, cnt: (bi, 0, idx[bi, kj, t])),
                  pl.BlockSpec((None, None, bk, d), k_map),
                  pl.BlockSpec((None, None, bk, d), k_map),
                  pl.BlockSpec((None, bk, 4), lambda bi, h, kj, g, t, idx, cnt: (bi, kj, 0))],
        out_specs=[pl.BlockSpec((None, None, bk, d), k_map), pl.BlockSpec((None, None, bk, d), k_map)],
        scratch_shapes=[pltpu.VMEM((bk, d), _F32), pltpu.VMEM((bk, d), _F32)])
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale), grid_spec=dkv_spec,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(3, 2), interpret=interpret, name="irg_attention_dkv",
    )(lists.k_idx, lists.k_count, q, dout, lse, delta, qm_rows, k, v, jnp.swapaxes(km_rows, 1, 2))
    return dq, dk, dv


_attend = kernel_vjp.kernel_attention(_forward, _backward)


# ---------------------------------------------------------------- entry point

def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_seq(x: jax.Array, size: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, size - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


def attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q: int = 128, block_k: int = 128,
              interpret: bool | None = None) -> jax.Array:
    """Packed attention under the metadata mask on TPU (``interpret``: Pallas interpreter)."""
    _check_shapes(q, k, v)
    lq, lk = q.shape[1], k.shape[1]
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"model.attention.block_q/block_k must be > 0, got {block_q}, {block_k}")
    bq, bk = min(block_q, _round_up(lq, 8)), min(block_k, _round_up(lk, 8))  # clamped to the lengths
    qm_rows, km_rows, lists = block_lists.prepare(q_meta, k_meta, lq, lk, bq, bk)
    lq_pad, lk_pad = qm_rows.shape[-1], km_rows.shape[-1]
    qt = jnp.swapaxes(_pad_seq(q, lq_pad), 1, 2)
    kt = jnp.swapaxes(_pad_seq(k, lk_pad), 1, 2)
    vt = jnp.swapaxes(_pad_seq(v, lk_pad), 1, 2)
    out = _attend((bq, bk, use_interpret(interpret)), qt, kt, vt, qm_rows, km_rows, lists)
    return jnp.swapaxes(out, 1, 2)[:, :lq]
