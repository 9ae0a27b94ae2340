"""Shared building blocks: the Linear layer, 2-D sin-cos tables, timestep features, space-to-depth.

Conventions (pinned by tests/fixtures/bagel_tiny Reference D):
  * a patch vector is ordered (py, px, c), channel fastest, patches row-major;
  * a 2-D sin-cos table row ``r*S + c`` is [sin(c w), cos(c w), sin(r w), cos(r w)];
  * timestep features are [cos(t f), sin(t f)] with t in [0, 1], unscaled.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from irg_jax.data.transforms import patchify
from irg_jax.parallel.sharding import constrain, param

Initializer = Callable[..., jax.Array]


class Linear(nnx.Module):
    """y = x @ kernel + bias with float32 parameters and compute in the input dtype.

    ``kernel`` is stored (in, out) with logical axes ``axes``; ``bias`` (out,) takes
    the output axis name.
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool = True,
                 axes: tuple[str | None, str | None] = (None, None),
                 kernel_init: Initializer = nnx.initializers.lecun_normal()):
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = param(kernel_init(rngs.params(), (in_features, out_features), jnp.float32), tuple(axes))
        self.bias = param(jnp.zeros((out_features,), jnp.float32), (axes[1],)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects last dim {self.in_features}, got input shape {x.shape}")
        y = jnp.dot(x, self.kernel[...].astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


def sincos_2d_table(num_per_side: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos position table [S*S, dim], float32 (computed in float64).

    Row ``r*S + c`` is [sin(c w), cos(c w), sin(r w), cos(r w)], each of width dim/4,
    with w_k = 10000^(-k/(dim/4)): the column is encoded first, the row second.
    """
    if dim % 4:
        raise ValueError(f"sin-cos table width must be a multiple of 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(num_per_side, dtype=np.float64),
                             np.arange(num_per_side, dtype=np.float64), indexing="ij")

    def encode(coord: np.ndarray) -> np.ndarray:
        angles = coord.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


def timestep_features(t: jax.Array, dim: int = 256) -> jax.Array:
    """DiT sinusoidal features of flow time t in [0, 1] (unscaled): [cos(t f), sin(t f)], float32.

    f_k = exp(-ln(10000) k / (dim/2)), k = 0 .. dim/2 - 1. Output shape t.shape + (dim,).
    """
    if dim % 2:
        raise ValueError(f"timestep feature width must be even, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.asarray(t, jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimestepEmbedder(nnx.Module):
    """Linear(freq_dim -> hidden), SiLU, Linear(hidden -> hidden) on :func:`timestep_features`.

    ``scale`` multiplies t before the features: BAGEL uses 1 (t in [0, 1], so only the lowest
    frequencies vary); DiT-style models trained from scratch use 1000.
    """

    def __init__(self, hidden: int, rngs: nnx.Rngs, freq_dim: int = 256, scale: float = 1.0):
        self.freq_dim = freq_dim
        self.scale = float(scale)
        self.fc1 = Linear(freq_dim, hidden, rngs=rngs, axes=("time_freq", "embed"))
        self.fc2 = Linear(hidden, hidden, rngs=rngs, axes=(None, "embed"))

    def __call__(self, t: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        t = jnp.asarray(t, jnp.float32)
        # Per-token activations follow t's (batch) sharding, not the kernels' embed sharding:
        # else the weight gradients all-gather the global batch's [B, L, D] hidden states.
        rows = (lambda x: constrain(x, ("batch",) + (None,) * t.ndim)) if t.ndim else (lambda x: x)
        h = rows(self.fc1(timestep_features(self.scale * t, self.freq_dim).astype(dtype)))
        return rows(self.fc2(jax.nn.silu(h)))


def space_to_depth(x, p: int):
    """[N, H, W, C] -> [N, H/p, W/p, p*p*C] with the vector ordered (py, px, c) (:func:`patchify`'s order)."""
    n, h, w, c = x.shape
    return patchify(x, p).reshape(n, h // p, w // p, p * p * c)


def depth_to_space(x, p: int, channels: int):
    """Inverse of :func:`space_to_depth`: [N, h, w, p*p*C] -> [N, h*p, w*p, C]."""
    n, h, w, d = x.shape
    if d != p * p * channels:
        raise ValueError(f"vector width {d} != {p}*{p}*{channels}")
    x = x.reshape(n, h, w, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h * p, w * p, channels)


def unpatchify_latents(tokens, h: int, w: int, p: int, channels: int):
    """Tokens [N, h*w, p*p*C] (row-major over an h x w grid) -> latents [N, h*p, w*p, C]."""
    n, num, d = tokens.shape
    if num != h * w:
        raise ValueError(f"{num} tokens do not form a {h}x{w} grid")
    return depth_to_space(tokens.reshape(n, h, w, d), p, channels)
