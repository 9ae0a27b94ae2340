"""Fixed-capacity KV cache and the cached forward primitives of BAGEL inference (spec §6.1).

The cache holds, per layer, keys (after q/k-norm and RoPE) and values of shape
``[num_layers, B, capacity, kv_heads, head_dim]``, plus per-row ``length`` (filled
slots) and ``rope`` (next RoPE position). Rows are independent contexts (e.g. the CFG
branches), each with its own length; a row can sit out an append (``active`` False).
Cache rows are in logical order, like the official merged cache.

Every primitive runs the new tokens as one block laid out ``[und | gen]`` against the
cached keys plus the block's own keys, with the mask from
:func:`irg_jax.model.attention.allowed_mask`: cached slots ``< length`` are earlier
tokens of document 0 and empty slots belong to no document, so new text is causal with
bottom-right alignment (it sees the whole cache) and image blocks are bidirectional.
Attention reads only the filled blocks of the cache (:mod:`irg_jax.model.cached_attention`),
and the new keys/values are scattered into their slots in place, so a token's cost
follows the context, not the capacity.

  append_text          [bos] ids [eos] etc., und expert, causal; rope += count
  append_vit_image     [soi] ViT tokens [eoi], und expert, full; all at one rope; rope += 1
  append_vae_image     [soi] clean latents (t = 0) [eoi]; markers und, latents gen; rope += 1
  query_noisy_latents  [soi] x_t tokens [eoi] at the current rope; reads the cache, never
                       writes it; returns the velocity of the latent tokens
  decode_step          one text token; returns its logits

All functions are pure (model, cache, arrays) -> outputs with static shapes; wrap them
in ``nnx.jit`` (or split/merge + ``jax.jit``). Writes past ``capacity`` are dropped:
size the cache for the whole context.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from irg_jax.data.packed_batch import CAUSAL, FULL
from irg_jax.model.attention import INVALID_DOC, TokenMeta


class KVCache(NamedTuple):
    keys: jax.Array    # [num_layers, B, capacity, kv_heads, head_dim]
    values: jax.Array  # [num_layers, B, capacity, kv_heads, head_dim]
    length: jax.Array  # int32 [B] filled slots
    rope: jax.Array    # int32 [B] next RoPE position

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


def init_cache(model_cfg, batch: int, capacity: int, dtype=None) -> KVCache:
    """An empty cache (compute dtype of the model unless ``dtype`` is given)."""
    llm = model_cfg.llm
    shape = (llm.num_layers, batch, capacity, llm.num_kv_heads, llm.head_dim)
    dtype = jnp.dtype(dtype or model_cfg.dtype)
    zeros = jnp.zeros((batch,), jnp.int32)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), zeros, zeros)


def _block_meta(cache: KVCache, offsets: jax.Array, valid: jax.Array, mode: int) -> TokenMeta:
    """Metadata of a new block: logical position length + offset; invalid tokens in no document."""
    b, n = offsets.shape
    return TokenMeta(jnp.where(valid, 0, INVALID_DOC).astype(jnp.int32), jnp.zeros((b, n), jnp.int32),
                     jnp.full((b, n), mode, jnp.int32), (cache.length[:, None] + offsets).astype(jnp.int32))


def _slots(cache: KVCache, offsets: jax.Array, valid: jax.Array) -> jax.Array:
    """Cache slot of each new token: length + offset; invalid tokens past the capacity (dropped)."""
    return jnp.where(valid, cache.length[:, None] + offsets, cache.capacity).astype(jnp.int32)


def _run(model, cache: KVCache, h, rope_pos, meta: TokenMeta, und_len: int, slots: jax.Array | None):
    """The decoder over a new block; with ``slots`` its keys/values are written into the cache."""
    return model.decoder(h.astype(model.dtype), rope_pos, meta, und_len,
                         past_kv=(cache.keys, cache.values, cache.length, slots))


def _advance(cache: KVCache, out, count, rope_advance) -> KVCache:
    """The cache written by the decoder (``out.past_kv``), with length and rope advanced."""
    return KVCache(*out.past_kv, cache.length + count.astype(jnp.int32), cache.rope + rope_advance.astype(jnp.int32))


def _active(active, b: int) -> jax.Array:
    return jnp.ones((b,), bool) if active is None else jnp.asarray(active, bool)


def _markers(model, b: int) -> jax.Array:
    ids = jnp.array([model.cfg.special_ids.start_of_image, model.cfg.special_ids.end_of_image], jnp.int32)
    return model.embed_text(jnp.broadcast_to(ids, (b, 2)))


def append_text(model, cache: KVCache, ids: jax.Array, num_valid: jax.Array | None = None):
    """Prefill text tokens ids [B, n] (right-padded to n; ``num_valid`` [B] real tokens, 0 = skip row).

    Returns (cache, hidden [B, n, D] after the final norm).
    """
    b, n = ids.shape
    num_valid = jnp.full((b,), n, jnp.int32) if num_valid is None else jnp.asarray(num_valid, jnp.int32)
    offsets = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    valid = offsets < num_valid[:, None]
    out = _run(model, cache, model.embed_text(ids), cache.rope[:, None] + offsets,
               _block_meta(cache, offsets, valid, CAUSAL), n, _slots(cache, offsets, valid))
    cache = _advance(cache, out, num_valid, num_valid)
    return cache, out.hidden


def decode_step(model, cache: KVCache, tokens: jax.Array, active: jax.Array | None = None):
    """One text token per row [B] -> (logits [B, V] float32, cache with the token appended)."""
    num_valid = _active(active, tokens.shape[0]).astype(jnp.int32)
    cache, hidden = append_text(model, cache, tokens[:, None], num_valid)
    return model.decoder.logits(hidden[:, 0]), cache


def append_vit_image(model, cache: KVCache, patches: jax.Array, pos_ids: jax.Array,
                     active: jax.Array | None = None) -> KVCache:
    """Prefill one ViT image per row: patches [B, Np, 3p^2], pos_ids [B, Np] (row * side + col)."""
    b, n_p = pos_ids.shape
    act = _active(active, b)
    feats = model.embed_vit(patches, pos_ids, jnp.zeros((b, n_p), jnp.int32))
    marks = _markers(model, b)
    h = jnp.concatenate([marks[:, :1], feats.astype(marks.dtype), marks[:, 1:]], axis=1)
    n = n_p + 2
    offsets = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    valid = jnp.broadcast_to(act[:, None], (b, n))
    out = _run(model, cache, h, jnp.broadcast_to(cache.rope[:, None], (b, n)),
               _block_meta(cache, offsets, valid, FULL), n, _slots(cache, offsets, valid))
    return _advance(cache, out, act * n, act)


def _latent_block(model, cache: KVCache, x: jax.Array, t: jax.Array, pos_ids: jax.Array, valid_rows: jax.Array,
                  write: bool):
    """[soi, eoi | latents] with logical offsets soi 0, latents 1..N, eoi N+1; markers und, latents gen."""
    b, n_lat, _ = x.shape
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(b, -1), (b, n_lat))
    h = jnp.concatenate([_markers(model, b), model.embed_latents(x, t, pos_ids)], axis=1)
    offsets = jnp.concatenate([jnp.array([0, n_lat + 1], jnp.int32), jnp.arange(1, n_lat + 1, dtype=jnp.int32)])
    offsets = jnp.broadcast_to(offsets, (b, n_lat + 2))
    valid = jnp.broadcast_to(valid_rows[:, None], offsets.shape)
    out = _run(model, cache, h, jnp.broadcast_to(cache.rope[:, None], offsets.shape),
               _block_meta(cache, offsets, valid, FULL), 2, _slots(cache, offsets, valid) if write else None)
    return out


def append_vae_image(model, cache: KVCache, latents: jax.Array, pos_ids: jax.Array,
                     active: jax.Array | None = None) -> KVCache:
    """Prefill one clean VAE image per row: latent tokens [B, N, D_lat] at t = 0, pos_ids [B, N]."""
    b, n_lat, _ = latents.shape
    act = _active(active, b)
    out = _latent_block(model, cache, latents, jnp.zeros((b,), jnp.float32), pos_ids, act, write=True)
    return _advance(cache, out, act * (n_lat + 2), act)


def query_noisy_latents(model, cache: KVCache, x_t: jax.Array, t: jax.Array, pos_ids: jax.Array) -> jax.Array:
    """Velocity [B, N, D_lat] (float32) of noisy latents x_t [B, N, D_lat] at time t ([B] or [B, N]).

    The query [soi, x_t, eoi] sits at the row's current rope position and attends to the
    cache and to itself; the cache is not modified.
    """
    out = _latent_block(model, cache, x_t, t, pos_ids, jnp.ones((x_t.shape[0],), bool), write=False)
    return model.velocity(out.hidden[:, 2:])
