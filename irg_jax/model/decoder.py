"""Qwen2 Mixture-of-Transformers decoder (BAGEL's language model).

Each layer holds two experts with identical shapes: ``und`` (text, image markers, ViT
tokens) and ``gen`` (VAE latent tokens). Each expert has its own input/post-attention
RMSNorms, q/k/v (with bias) and o (no bias) projections, per-head q/k RMSNorms applied
before RoPE, and a SiLU-gated MLP; the final norm is per expert as well. Only the token
embedding and the untied ``lm_head`` are shared.

Routing is by static slices: a sequence is laid out ``[und tokens | gen tokens]`` and the
caller passes ``und_len``; each expert runs only on its slice, and one joint attention
covers all tokens (mask from :class:`irg_jax.model.attention.TokenMeta`, which carries the
logical order). RMSNorm statistics, RoPE and softmax are computed in float32.

Keys and values are returned per layer (after q/k-norm and RoPE) so the KV cache can
store them; past keys/values (a cache) may be prepended to every layer's attention.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from irg_jax.model import attention as attn_lib
from irg_jax.model import cached_attention, layer_scan, remat
from irg_jax.model.attention import TokenMeta
from irg_jax.model.cached_attention import CacheView
from irg_jax.model.embeddings import Linear
from irg_jax.parallel.sharding import constrain, param


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, statistics in float32 (Qwen2RMSNorm)."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.scale = param(jnp.ones((dim,), jnp.float32), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * h.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Qwen2 default RoPE: cos, sin [..., L, head_dim] (fp32) for integer positions [..., L]."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, L, H, D] rotated with the half-split ``rotate_half`` convention, in float32."""
    h = x.astype(jnp.float32)
    half = h.shape[-1] // 2
    rotated = jnp.concatenate([-h[..., half:], h[..., :half]], axis=-1)
    return (h * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


class HeadsProjection(nnx.Module):
    """[B, L, D] -> [B, L, H, head_dim]; kernel [D, H, head_dim], optional bias [H, head_dim]."""

    def __init__(self, dim: int, heads: int, head_dim: int, heads_axis: str, *, use_bias: bool, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        self.kernel = param(init(rngs.params(), (dim, heads, head_dim), jnp.float32), ("embed", heads_axis, "head_dim"))
        self.bias = param(jnp.zeros((heads, head_dim), jnp.float32), (heads_axis, "head_dim")) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("bld,dhk->blhk", x, self.kernel[...].astype(x.dtype))
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class OutProjection(nnx.Module):
    """[B, L, H, head_dim] -> [B, L, D]; kernel [H, head_dim, D], no bias."""

    def __init__(self, heads: int, head_dim: int, dim: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        self.kernel = param(init(rngs.params(), (heads, head_dim, dim), jnp.float32), ("q_heads", "head_dim", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("blhk,hkd->bld", x, self.kernel[...].astype(x.dtype))


class GatedMLP(nnx.Module):
    """down(silu(gate(x)) * up(x)), no biases.

    With ``token_chunk`` > 0, a sequence longer than that runs in chunks of ``token_chunk``
    tokens (a ``lax.map`` whose body is rematerialised), so the [tokens, intermediate]
    activations exist for one chunk at a time, in the forward and in the backward.
    """

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, token_chunk: int = 0):
        self.gate_proj = Linear(dim, hidden, rngs=rngs, use_bias=False, axes=("embed", "mlp"))
        self.up_proj = Linear(dim, hidden, rngs=rngs, use_bias=False, axes=("embed", "mlp"))
        self.down_proj = Linear(hidden, dim, rngs=rngs, use_bias=False, axes=("mlp", "embed"))
        self.token_chunk = token_chunk

    def _apply(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(h, ("batch", "length", "mlp")))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        chunk = self.token_chunk
        if not chunk or n <= chunk:
            return self._apply(x)
        num = -(-n // chunk)
        xs = jnp.pad(x, ((0, 0), (0, num * chunk - n), (0, 0))).reshape(b, num, chunk, d).swapaxes(0, 1)
        ys = jax.lax.map(jax.checkpoint(self._apply), xs)  # zero padding maps to zero: no bias
        return ys.swapaxes(0, 1).reshape(b, num * chunk, d)[:, :n]


class Expert(nnx.Module):
    """One MoT expert of one decoder layer (the und or the gen copy)."""

    def __init__(self, llm, *, rngs: nnx.Rngs, mlp_chunk: int = 0):
        d, hd = llm.hidden_size, llm.head_dim
        self.input_layernorm = RMSNorm(d, llm.rms_norm_eps)
        self.q_proj = HeadsProjection(d, llm.num_heads, hd, "q_heads", use_bias=True, rngs=rngs)
        self.k_proj = HeadsProjection(d, llm.num_kv_heads, hd, "kv_heads", use_bias=True, rngs=rngs)
        self.v_proj = HeadsProjection(d, llm.num_kv_heads, hd, "kv_heads", use_bias=True, rngs=rngs)
        self.o_proj = OutProjection(llm.num_heads, hd, d, rngs=rngs)
        self.q_norm = RMSNorm(hd, llm.rms_norm_eps) if llm.qk_norm else None
        self.k_norm = RMSNorm(hd, llm.rms_norm_eps) if llm.qk_norm else None
        self.post_attention_layernorm = RMSNorm(d, llm.rms_norm_eps)
        self.mlp = GatedMLP(d, llm.intermediate_size, rngs=rngs, token_chunk=mlp_chunk)

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        h = self.input_layernorm(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish(self, x: jax.Array, attn_out: jax.Array) -> jax.Array:
        x = x + self.o_proj(attn_out)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLayer(nnx.Module):
    def __init__(self, llm, attn_cfg, *, rngs: nnx.Rngs, mlp_chunk: int = 0):
        self.attn_cfg = ml_collections.FrozenConfigDict(attn_cfg)
        self.und = Expert(llm, rngs=rngs, mlp_chunk=mlp_chunk)
        self.gen = Expert(llm, rngs=rngs, mlp_chunk=mlp_chunk)

    def __call__(self, x, cos, sin, meta: TokenMeta, und_len: int, past: CacheView | None = None):
        """x [B, L, D] laid out [und | gen] -> (x', (k, v) of the L new tokens, past).

        With ``past`` (a KV cache), the new tokens attend to the cache's filled slots and to
        themselves and are written into it at ``past.slots`` (:mod:`irg_jax.model.cached_attention`);
        the updated cache comes back as the third output.
        """
        L = x.shape[1]
        parts = []  # (expert, start, stop)
        if und_len > 0:
            parts.append((self.und, 0, und_len))
        if und_len < L:
            parts.append((self.gen, und_len, L))
        qkv = [e.qkv(x[:, a:b], cos[:, a:b], sin[:, a:b]) for e, a, b in parts]
        q, k, v = (jnp.concatenate(t, axis=1) if len(parts) > 1 else t[0] for t in zip(*qkv))
        q = constrain(q, ("batch", "length", "q_heads", None))
        if past is None:
            out = attn_lib.attend(q, k, v, meta, meta, self.attn_cfg)
        else:
            out, past = cached_attention.attend(q, k, v, meta, meta, past, block_q=self.attn_cfg.block_q,
                                                block_k=self.attn_cfg.get("cache_block", 128))
        y = [e.finish(x[:, a:b], out[:, a:b]) for e, a, b in parts]
        y = jnp.concatenate(y, axis=1) if len(y) > 1 else y[0]
        return constrain(y, ("batch", "length", "embed")), (k, v), past


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs):
        self.embedding = param(jax.random.normal(rngs.params(), (vocab, dim), jnp.float32), ("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class DecoderOutput(NamedTuple):
    hidden: jax.Array        # [B, L, D] after the final (per-expert) norm
    keys: jax.Array          # [num_layers, B, L, Hk, D] new keys (after norm and RoPE)
    values: jax.Array        # [num_layers, B, L, Hk, D]
    layer_outputs: jax.Array | None  # [num_layers, B, L, D] residual stream after each layer
    past_kv: tuple[jax.Array, jax.Array] | None = None  # the cache's (keys, values) with the new ones written


def _stack_layers(llm, attn_cfg, rngs: nnx.Rngs, mlp_chunk: int) -> DecoderLayer:
    """One DecoderLayer whose parameters carry a leading [num_layers] axis (for scan).

    ``nnx.vmap`` adds that axis to each parameter's logical names too (``PARTITION_NAME``
    None: the layers axis is not sharded)."""
    keys = jax.random.split(rngs.params(), llm.num_layers)
    make = lambda key: DecoderLayer(llm, attn_cfg, rngs=nnx.Rngs(params=key), mlp_chunk=mlp_chunk)  # noqa: E731
    return nnx.vmap(make, in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})(keys)


class Decoder(nnx.Module):
    """Shared embedding, MoT layers, per-expert final norm, untied lm_head."""

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        llm = ml_collections.FrozenConfigDict(model_cfg.llm)
        attn_cfg = ml_collections.FrozenConfigDict(model_cfg.attention)
        self.llm = llm
        self.scan_layers = bool(model_cfg.scan_layers)
        self.remat_policy = remat.policy_name(model_cfg)
        mlp_chunk = int(model_cfg.get("mlp_chunk", 0))
        self.layers_per_save = int(model_cfg.get("layers_per_save", 1))
        self.embed_tokens = Embedding(llm.vocab_size, llm.hidden_size, rngs=rngs)
        if self.scan_layers:
            self.layers = _stack_layers(llm, attn_cfg, rngs, mlp_chunk)
        else:
            self.layers = nnx.List([DecoderLayer(llm, attn_cfg, rngs=rngs, mlp_chunk=mlp_chunk)
                                    for _ in range(llm.num_layers)])
        self.norm_und = RMSNorm(llm.hidden_size, llm.rms_norm_eps)
        self.norm_gen = RMSNorm(llm.hidden_size, llm.rms_norm_eps)
        self.lm_head = Linear(llm.hidden_size, llm.vocab_size, rngs=rngs, use_bias=False, axes=("embed", "vocab"))

    def __call__(self, x: jax.Array, rope_pos: jax.Array, meta: TokenMeta, und_len: int, *,
                 past_kv: tuple[jax.Array, jax.Array, jax.Array, jax.Array | None] | None = None,
                 collect_layer_outputs: bool = False, with_kv: bool = True) -> DecoderOutput:
        """Run all layers on x [B, L, D] (laid out [und | gen], ``und_len`` static).

        ``past_kv``: optional cache (keys, values [num_layers, B, capacity, Hk, D], length [B], slots
        [B, L] or None); each layer reads its own slice and writes its new keys/values at ``slots``
        in place (see :mod:`irg_jax.model.cached_attention`); the result's ``past_kv`` is the cache after.
        ``with_kv=False`` (training) returns no keys/values; with scanned layers under the
        ``nothing_saveable`` policy the layers then run through :func:`layer_scan.scan_layers`,
        which saves each layer's input (or every ``model.layers_per_save``-th) in the compute dtype
        for the backward pass.
        """
        cos, sin = rope_tables(rope_pos, self.llm.head_dim, self.llm.rope_theta)
        x = constrain(x, ("batch", "length", "embed"))
        if (self.scan_layers and self.remat_policy == "nothing_saveable" and past_kv is None
                and not with_kv and not collect_layer_outputs):
            graphdef, states = nnx.split(self.layers)

            def layer_fn(state, h, consts):
                cos, sin, meta = consts
                h, _, _ = nnx.merge(graphdef, state)(h, cos, sin, meta, und_len)
                return h

            x = layer_scan.scan_layers(layer_fn, ("batch", "length", "embed"), self.layers_per_save, states, x,
                                       (cos, sin, meta))
            return DecoderOutput(self.final_norm(x, und_len), None, None, None)

        # the cache arrays are loop state of the layer loop (see cached_attention): (keys, values) or None
        cache = None if past_kv is None else tuple(past_kv[:2])

        def run(layer_state, graphdef, h, cache, index):
            layer = nnx.merge(graphdef, layer_state)
            past = None if cache is None else CacheView(*cache, past_kv[2], index, past_kv[3])
            h, (k, v), past = layer(h, cos, sin, meta, und_len, past)
            cache = None if past is None else (past.keys, past.values)
            return (h, cache), (k, v, h if collect_layer_outputs else None)

        run = remat.checkpoint(run, self.remat_policy, static_argnums=(1,))

        if self.scan_layers:
            graphdef, states = nnx.split(self.layers)

            def body(carry, xs):
                state, index = xs
                return run(state, graphdef, *carry, index)

            indices = jnp.arange(self.llm.num_layers, dtype=jnp.int32)
            (x, cache), (keys, values, outs) = jax.lax.scan(body, (x, cache), (states, indices))
        else:
            collected = []
            for i, layer in enumerate(self.layers):
                graphdef, state = nnx.split(layer)
                (x, cache), out = run(state, graphdef, x, cache, jnp.int32(i))
                collected.append(out)
            keys, values, outs = (None if t[0] is None else jnp.stack(t) for t in zip(*collected))
        h = self.final_norm(x, und_len)
        return DecoderOutput(h, keys, values, outs, cache)

    def final_norm(self, x: jax.Array, und_len: int) -> jax.Array:
        parts = []
        if und_len > 0:
            parts.append(self.norm_und(x[:, :und_len]))
        if und_len < x.shape[1]:
            parts.append(self.norm_gen(x[:, und_len:]))
        return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def logits(self, h: jax.Array) -> jax.Array:
        """lm_head in float32 accumulation: [..., D] -> [..., V]."""
        return jnp.einsum("...d,dv->...v", h, self.lm_head.kernel[...].astype(h.dtype),
                          preferred_element_type=jnp.float32)
