"""On-device text generation into a fixed-capacity KV cache (spec §6.2).

The loop mirrors BAGEL's ``generate_text`` for a batch, with per-row stopping:

    step j (0-based): feed token (bos at j = 0) -> logits -> next token
    the row stops when next == eos or j + 1 == max_tokens; otherwise next is text
    token j and is fed at step j + 1

so a row emits at most ``max_tokens - 1`` text tokens (BAGEL returns the start token
plus the first ``max_length - 1`` predictions), and its cache ends with the fed tokens
``[bos] ids``. Appending ``eos`` afterwards (:func:`close_segment`) turns that into the
canonical ``[bos] ids [eos]`` text segment the official inferencer re-prefills — on
device, without re-tokenising.

Everything runs inside one ``lax.while_loop`` (no host round trip per token); finished
rows sit out the remaining steps (their cache is not written). Randomness is per row:
the token of row b at step j is drawn with ``fold_in(row_key[b], j)``, so a row's text
does not depend on which other prompts share its batch.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from irg_jax.inference.placement import constrain_cache, constrain_rows
from irg_jax.model import kv_cache

# (cache, tokens [B], active [B]) -> (logits [B, V] float32, cache)
StepFn = Callable[[object, jax.Array, jax.Array], tuple[jax.Array, object]]


class TextSampling(NamedTuple):
    """Sampling settings. ``temperature`` is traced (<= 0 means greedy); ``top_k`` (0 = off)
    and ``top_p`` (1.0 = off) are static (they change the compiled program)."""

    temperature: float | jax.Array = 0.3
    top_k: int = 0
    top_p: float = 1.0


def _filter_top_k(logits: jax.Array, k: int) -> jax.Array:
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def _filter_top_p(logits: jax.Array, p: float) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def next_tokens(logits: jax.Array, keys: jax.Array, settings: TextSampling) -> jax.Array:
    """Pick one token per row from logits [B, V] with per-row keys [B]: argmax when the
    temperature is <= 0, otherwise a draw from softmax(filtered logits / temperature)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temperature = jnp.asarray(settings.temperature, jnp.float32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    if settings.top_k:
        scaled = _filter_top_k(scaled, min(int(settings.top_k), logits.shape[-1]))
    if settings.top_p < 1.0:
        scaled = _filter_top_p(scaled, float(settings.top_p))
    drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


class Generated(NamedTuple):
    ids: jax.Array      # int32 [B, max_tokens - 1] text tokens (no bos / eos), 0 after length
    length: jax.Array   # int32 [B] number of text tokens
    ended: jax.Array    # bool [B] the row sampled eos (False: it ran out of tokens)
    first_logits: jax.Array  # float32 [B, V] logits after the start token (the context's prediction)


def generate(step_fn: StepFn, cache, start_tokens: jax.Array, row_keys: jax.Array, *, max_tokens: int,
             eos_id: int, settings: TextSampling = TextSampling(), active: jax.Array | None = None):
    """Decode up to ``max_tokens`` steps per row. Returns (cache, :class:`Generated`).

    ``start_tokens`` [B] (bos), ``row_keys`` [B] PRNG keys, ``active`` [B] rows to decode
    (others are left untouched and return length 0).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    b = start_tokens.shape[0]
    done0 = jnp.zeros((b,), bool) if active is None else ~jnp.asarray(active, bool)
    ids0 = jnp.zeros((b, max(max_tokens - 1, 1)), jnp.int32)
    # step 0 runs outside the loop: its logits are returned and fix the loop state's shapes
    logits, cache = step_fn(cache, start_tokens.astype(jnp.int32), ~done0)
    first = jnp.where(done0[:, None], 0.0, logits.astype(jnp.float32))
    state = (jnp.int32(0), cache, start_tokens.astype(jnp.int32), done0, jnp.zeros((b,), bool), ids0,
             jnp.zeros((b,), jnp.int32))
    init = _advance(state, logits, row_keys, max_tokens, eos_id, settings)

    def cond(state):
        step, _, _, done, *_ = state
        return (step < max_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, tokens, done, *rest = state
        logits, cache = step_fn(cache, tokens, ~done)
        return _advance((step, cache, tokens, done, *rest), logits, row_keys, max_tokens, eos_id, settings)

    _, cache, _, _, ended, ids, length = jax.lax.while_loop(cond, body, init)
    return cache, Generated(ids[:, :max_tokens - 1], length, ended, first)


def _advance(state, logits, row_keys, max_tokens: int, eos_id: int, settings: TextSampling):
    """Sample from the logits of step ``state[0]`` and update the loop state (rows not done only)."""
    step, cache, tokens, done, ended, ids, length = state
    live = ~done
    keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
    nxt = next_tokens(logits, keys, settings)
    is_eos = nxt == eos_id
    stop = is_eos | (step + 1 >= max_tokens)
    emit = live & ~stop
    col = jnp.minimum(step, ids.shape[1] - 1)
    ids = ids.at[:, col].set(jnp.where(emit, nxt, ids[:, col]))
    return (step + 1, cache, jnp.where(live, nxt, tokens), done | (live & stop), ended | (live & is_eos), ids,
            length + emit.astype(jnp.int32))


def model_step_fn(model) -> StepFn:
    """The KV-cache decode step of a Bagel model as a :data:`StepFn` (rows pinned to the batch axes
    on a mesh, so the loop state stays split like the prompts)."""
    def step(cache, tokens, active):
        logits, cache = kv_cache.decode_step(model, cache, tokens, active)
        return constrain_rows(logits), constrain_cache(cache)
    return step


def close_segment(model, cache, eos_id: int, active: jax.Array | None = None):
    """Append ``eos`` to every (active) row: ``[bos] ids`` becomes the canonical ``[bos] ids [eos]``."""
    b = cache.length.shape[0]
    count = jnp.ones((b,), jnp.int32) if active is None else jnp.asarray(active, jnp.int32)
    cache, _ = kv_cache.append_text(model, cache, jnp.full((b, 1), eos_id, jnp.int32), count)
    return cache


def generate_segment(model, cache, row_keys: jax.Array, *, max_tokens: int, settings: TextSampling = TextSampling(),
                     active: jax.Array | None = None):
    """Generate one text segment per row into ``cache`` and close it: (cache, Generated).

    The cache ends with ``[bos] ids [eos]`` at consecutive RoPE positions, exactly what
    prefilling the sampled ids as a text segment gives.
    """
    ids = model.cfg.special_ids
    b = cache.length.shape[0]
    cache, out = generate(model_step_fn(model), cache, jnp.full((b,), ids.bos, jnp.int32), row_keys,
                          max_tokens=max_tokens, eos_id=ids.eos, settings=settings, active=active)
    return close_segment(model, cache, ids.eos, active), out
