"""layer_scan.scan_layers: gradients equal plain autodiff of the layer fold, for every save interval."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from irg_jax.model import layer_scan

LAYERS, B, L, D = 6, 2, 5, 8


def _layer(p, h, consts):
    scale, shift = consts
    y = jnp.tanh(h @ p["w"] + p["b"]) * scale + shift
    return h + y.astype(h.dtype)


def _inputs(dtype):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w": jax.random.normal(keys[0], (LAYERS, D, D)) / np.sqrt(D),
              "b": jax.random.normal(keys[1], (LAYERS, D))}
    h = jax.random.normal(keys[2], (B, L, D)).astype(dtype)
    consts = (jnp.float32(0.7), jax.random.normal(keys[3], (D,)))
    return params, h, consts


def _loss(fold, params, h, consts):
    out = fold(params, h, consts)
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))


def _plain(params, h, consts):
    cast = jax.tree.map(lambda a: a.astype(h.dtype), params)
    return jax.lax.scan(lambda h, p: (_layer(p, h, consts), None), h, cast)[0]


def _scanned(k):
    def fold(params, h, consts):
        cast = jax.tree.map(lambda a: a.astype(h.dtype), params)
        return layer_scan.scan_layers(_layer, ("batch", "length", "embed"), k, cast, h, consts)
    return fold


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_gradients_match_autodiff(k):
    params, h, consts = _inputs(jnp.float32)
    want = jax.grad(_loss, argnums=(1, 2))(_plain, params, h, consts)
    got = jax.jit(jax.grad(_loss, argnums=(1, 2)), static_argnums=0)(_scanned(k), params, h, consts)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(_scanned(k)(params, h, consts), _plain(params, h, consts), rtol=1e-6)


def test_bf16_backward_reads_back_the_forward_values():
    """In bf16 the backward must see the exact inputs the forward computed (saved as raw bits)."""
    params, h, consts = _inputs(jnp.bfloat16)
    grads = [jax.jit(jax.grad(_loss, argnums=(1, 2)), static_argnums=0)(_scanned(k), params, h, consts)
             for k in (1, 2, 3)]
    for other in grads[1:]:
        for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(other)):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_saved_stack_shrinks_with_the_interval():
    params, h, consts = _inputs(jnp.bfloat16)
    for k, groups in ((1, 6), (2, 3), (3, 2)):
        _, (_, saved, _) = layer_scan._forward(_layer, ("batch", "length", "embed"), k, params, h, consts)
        assert saved.shape == (groups, B, L, D) and saved.dtype == jnp.uint16


def test_interval_must_divide_the_layers():
    params, h, consts = _inputs(jnp.float32)
    with pytest.raises(ValueError, match="layers_per_save=4 must be >= 1 and divide the 6 layers"):
        jax.grad(_loss, argnums=1)(_scanned(4), params, h, consts)
