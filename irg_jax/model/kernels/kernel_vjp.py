"""The custom VJP shared by the attention kernels: a kernel forward and a kernel backward as one function."""
from __future__ import annotations

import functools
from typing import Callable

import jax


def kernel_attention(forward: Callable, backward: Callable) -> Callable:
    """``attend(cfg, q, k, v, qm_rows, km_rows, lists) -> out`` with a custom VJP.

    ``forward(cfg, q, k, v, qm_rows, km_rows, lists) -> (out, lse)``;
    ``backward(cfg, q, k, v, qm_rows, km_rows, lists, out, lse, dout) -> (dq, dk, dv)``.
    ``cfg`` is static (hashable); metadata and block lists get no gradient.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def attend(cfg, q, k, v, qm_rows, km_rows, lists):
        return forward(cfg, q, k, v, qm_rows, km_rows, lists)[0]

    def attend_fwd(cfg, *args):
        out, lse = forward(cfg, *args)
        return out, (*args, out, lse)

    def attend_bwd(cfg, res, dout):
        return (*backward(cfg, *res, dout), None, None, None)

    attend.defvjp(attend_fwd, attend_bwd)
    return attend
