"""The rectified-flow ODE sampler with BAGEL/IRG classifier-free guidance (spec §6.3).

Schedule and update (``num_steps`` = N timesteps, N - 1 Euler updates):

    T = linspace(1, 0, N);  T = s T / (1 + (s - 1) T)          s = timestep shift
    for i in 0 .. N-2:  t = T[i], dt = T[i] - T[i+1];  x <- x - v(x, t) dt

Guidance is active at step i only when ``lo < t <= hi`` (the CFG interval) and the text
scale is above 1; outside it the conditional velocity is used alone (and only the
conditional branch is evaluated). The image scale matters only when it is above 1.

Combination (:func:`combine_guidance`), v_c / v_tu / v_iu = conditional, text-unconditional
and image-unconditional velocities, s_t / s_i the scales, r(a, b) = clamp(|a| / (|b| + 1e-8),
renorm_min, 1):

  global, channel:  v_t' = v_tu + s_t (v_c - v_tu);  v' = v_iu + s_i (v_t' - v_iu) (s_i > 1)
                    v = v' r(v_c, v')      global: norms over all tokens and channels of
                                           one image; channel: per-token norms
  text_channel:     v_t = (v_tu + s_t (v_c - v_tu)) r(v_c, v_t') per token
                    v = v_iu + s_i (v_t - v_iu) (s_i > 1, else v_t)

BAGEL's ``global`` norm spans the whole packed batch (it supports batch 1 only); here it
is taken per image, which is the same thing at batch 1.

Branches are evaluated as one batched forward: the caller's ``velocity_all`` maps the
latents repeated K times along the batch (row-major: row b's branches [cond, text-uncond,
img-uncond] are rows b*K .. b*K+K-1, so a row's branches stay on the device holding the
row when the batch is sharded) to K velocities. Scales, interval, shift and renorm_min are
traced values; the renorm type and the set of branches are static.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

RENORM_TYPES = ("global", "channel", "text_channel")

# x [B, N, D], t [B] -> v [B, N, D]
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


class Guidance(NamedTuple):
    """Traced CFG settings of one image generation (float32 scalars, shared by the batch)."""

    text_scale: jax.Array
    img_scale: jax.Array
    interval_lo: jax.Array
    interval_hi: jax.Array
    renorm_min: jax.Array

    @staticmethod
    def make(text_scale=4.0, img_scale=1.0, interval=(0.0, 1.0), renorm_min=0.0) -> "Guidance":
        f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        return Guidance(f(text_scale), f(img_scale), f(interval[0]), f(interval[1]), f(renorm_min))


def timesteps(num_steps: int, shift) -> jax.Array:
    """The shifted schedule T [num_steps], float32, from 1 down to 0."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (N timesteps give N - 1 Euler updates), got {num_steps}")
    t = jnp.linspace(1.0, 0.0, num_steps, dtype=jnp.float32)
    s = jnp.asarray(shift, jnp.float32)
    return s * t / (1.0 + (s - 1.0) * t)


def _per_row(x: jax.Array, ndim: int) -> jax.Array:
    """A scalar or [B] setting, broadcastable against [B, ...] of rank ``ndim``."""
    x = jnp.asarray(x, jnp.float32)
    return x.reshape(x.shape + (1,) * (ndim - x.ndim)) if x.ndim else x


def _norm(x: jax.Array, per_token: bool) -> jax.Array:
    axes = (-1,) if per_token else tuple(range(1, x.ndim))
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))


def _renorm(v_ref: jax.Array, v: jax.Array, per_token: bool, renorm_min) -> jax.Array:
    ratio = _norm(v_ref, per_token) / (_norm(v, per_token) + 1e-8)
    return v * jnp.clip(ratio, _per_row(renorm_min, v.ndim), 1.0)


def combine_guidance(v_cond: jax.Array, v_text_uncond: jax.Array, v_img_uncond: jax.Array | None,
                     text_scale, img_scale, renorm_type: str, renorm_min=0.0) -> jax.Array:
    """The guided velocity [B, N, D] from the branch velocities (float32; see module docstring).

    Scales may be scalars or per-row [B]. Assumes the text scale is above 1 (the caller
    uses v_cond alone otherwise); ``v_img_uncond`` None means no image guidance.
    """
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg renorm type {renorm_type!r}: expected one of {RENORM_TYPES}")
    v_c, v_tu = v_cond.astype(jnp.float32), v_text_uncond.astype(jnp.float32)
    s_t = _per_row(text_scale, v_c.ndim)
    v_t = v_tu + s_t * (v_c - v_tu)
    if renorm_type == "text_channel":
        v_t = _renorm(v_c, v_t, True, renorm_min)
    if v_img_uncond is not None:
        s_i = _per_row(img_scale, v_c.ndim)
        v_iu = v_img_uncond.astype(jnp.float32)
        v_t = jnp.where(s_i > 1.0, v_iu + s_i * (v_t - v_iu), v_t)
    if renorm_type != "text_channel":
        v_t = _renorm(v_c, v_t, renorm_type == "channel", renorm_min)
    return v_t


class Trajectory(NamedTuple):
    """Per-step record of a sampler run (only with ``record=True``)."""

    x_t: jax.Array         # [N-1, B, N_tok, D] input of each step
    t: jax.Array           # [N-1]
    velocity: jax.Array    # [N-1, B, N_tok, D] velocity used (guided or conditional)
    guided: jax.Array      # [N-1, B] bool: guidance active at this step


def sample(noise: jax.Array, *, num_steps: int, shift, num_branches: int, velocity_all: VelocityFn,
           velocity_cond: VelocityFn | None = None, guidance: Guidance | None = None,
           renorm_type: str = "global", record: bool = False, t_start=1.0):
    """Integrate from ``noise`` (x at t = 1, [B, N, D]) to t = 0; returns x (float32) [and a Trajectory].

    ``t_start`` < 1 (traced) starts later: ``noise`` is then x at ``t_start`` and the shifted
    schedule is scaled into [0, t_start] (same number of steps).

    ``num_branches`` (static) is 1 (no guidance), 2 (text) or 3 (text and image).
    ``velocity_all(x_repeated [B*K, N, D], t [B*K])`` evaluates all K branches of every row
    in one forward (row-major: rows b*K .. b*K+K-1 are row b's branches);
    ``velocity_cond(x, t)`` only the conditional one (used on steps without guidance;
    defaults to the conditional rows of ``velocity_all``).
    """
    if num_branches not in (1, 2, 3):
        raise ValueError(f"num_branches must be 1, 2 or 3, got {num_branches}")
    if num_branches > 1 and guidance is None:
        raise ValueError("guidance settings are required with more than one branch")
    b = noise.shape[0]
    schedule = timesteps(num_steps, shift) * jnp.asarray(t_start, jnp.float32)

    def cond_only(x, t_rows):
        if velocity_cond is not None:
            return velocity_cond(x, t_rows).astype(jnp.float32)
        v = velocity_all(jnp.repeat(x, num_branches, axis=0), jnp.repeat(t_rows, num_branches))
        return v[::num_branches].astype(jnp.float32)

    def guided_velocity(x, t_rows):
        v = velocity_all(jnp.repeat(x, num_branches, axis=0), jnp.repeat(t_rows, num_branches)).astype(jnp.float32)
        v = v.reshape((b, num_branches) + x.shape[1:])
        return combine_guidance(v[:, 0], v[:, 1], v[:, 2] if num_branches == 3 else None, guidance.text_scale,
                                guidance.img_scale, renorm_type, guidance.renorm_min)

    def step(x, i):
        t, t_next = schedule[i], schedule[i + 1]
        t_rows = jnp.full((b,), t, jnp.float32)
        if num_branches == 1:
            guided = jnp.zeros((b,), bool)
            v = cond_only(x, t_rows)
        else:
            g = guidance
            active = (g.interval_lo < t) & (t <= g.interval_hi) & (g.text_scale > 1.0)
            guided = jnp.broadcast_to(active, (b,))
            v = jax.lax.cond(active, guided_velocity, cond_only, x, t_rows)
        x_next = x - v * (t - t_next)
        return x_next, (Trajectory(x, t, v, guided) if record else None)

    x, traj = jax.lax.scan(step, noise.astype(jnp.float32), jnp.arange(num_steps - 1))
    return (x, traj) if record else x
