"""SigLIP NaViT vision encoder and the ViT -> LLM connector.

The encoder takes the packed ViT patches of a pack (any number of images of any
size, concatenated): patch vectors ordered (py, px, c), a learned position id per
patch (``row * max_patches_per_side + col``, a top-left crop of the table, no
interpolation) and an image id per patch. Attention is bidirectional within an image;
padding rows (image id -1) attend only to themselves. Blocks are pre-LN, followed by
a post-LayerNorm. Everything computes in the dtype of the input patches, with
LayerNorm statistics and the softmax in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from irg_jax.model.embeddings import Linear, sincos_2d_table
from irg_jax.parallel.sharding import param


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (PyTorch ``gelu_pytorch_tanh``)."""
    return jax.nn.gelu(x, approximate=True)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with scale and bias; statistics in float32."""

    def __init__(self, dim: int, eps: float, axis_name: str | None = "norm"):
        self.eps = eps
        self.scale = param(jnp.ones((dim,), jnp.float32), (axis_name,))
        self.bias = param(jnp.zeros((dim,), jnp.float32), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * self.scale[...] + self.bias[...]).astype(x.dtype)


def image_attention_mask(image_id: jax.Array) -> jax.Array:
    """[..., N] image ids -> [..., N, N] bool (query, key): same image, or itself (for padding)."""
    same = (image_id[..., :, None] == image_id[..., None, :]) & (image_id[..., :, None] >= 0)
    n = image_id.shape[-1]
    return same | jnp.eye(n, dtype=bool)


class SiglipAttention(nnx.Module):
    """Multi-head self-attention with biased q/k/v/out projections and a boolean mask."""

    def __init__(self, hidden: int, num_heads: int, rngs: nnx.Rngs):
        if hidden % num_heads:
            raise ValueError(f"ViT hidden {hidden} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        proj = dict(rngs=rngs, axes=("vit_embed", "vit_heads"))
        self.q_proj = Linear(hidden, hidden, **proj)
        self.k_proj = Linear(hidden, hidden, **proj)
        self.v_proj = Linear(hidden, hidden, **proj)
        self.out_proj = Linear(hidden, hidden, rngs=rngs, axes=("vit_heads", "vit_embed"))

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        heads = lambda t: t.reshape(*t.shape[:-1], self.num_heads, self.head_dim)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32)
        scores = scores * (self.head_dim ** -0.5)
        scores = jnp.where(mask[..., None, :, :], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("...hqk,...khd->...qhd", probs, v)
        return self.out_proj(out.reshape(*x.shape[:-1], -1))


class SiglipMLP(nnx.Module):
    def __init__(self, hidden: int, intermediate: int, rngs: nnx.Rngs):
        self.fc1 = Linear(hidden, intermediate, rngs=rngs, axes=("vit_embed", "vit_mlp"))
        self.fc2 = Linear(intermediate, hidden, rngs=rngs, axes=("vit_mlp", "vit_embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu_tanh(self.fc1(x)))


class SiglipBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, vit_cfg, rngs: nnx.Rngs):
        d = vit_cfg.hidden_size
        self.layer_norm1 = LayerNorm(d, vit_cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(d, vit_cfg.num_heads, rngs)
        self.layer_norm2 = LayerNorm(d, vit_cfg.layer_norm_eps)
        self.mlp = SiglipMLP(d, vit_cfg.intermediate_size, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nnx.Module):
    """Patch embedding + learned positions, ``vit_cfg.num_layers`` blocks, post-LayerNorm.

    ``vit_cfg.num_layers`` is the number of layers actually run and stored (the
    official vit_config.json lists one more; see :func:`irg_jax.model.vit_keys`).
    """

    def __init__(self, vit_cfg, rngs: nnx.Rngs):
        d = vit_cfg.hidden_size
        p = vit_cfg.patch_size
        self.patch_size = p
        self.max_patches_per_side = vit_cfg.max_patches_per_side
        self.patch_embedding = Linear(p * p * 3, d, rngs=rngs, axes=("patch", "vit_embed"))
        num_pos = vit_cfg.max_patches_per_side ** 2
        self.position_embedding = param(jax.random.normal(rngs.params(), (num_pos, d), jnp.float32) * 0.02,
                                        (None, "vit_embed"))
        self.layers = nnx.List([SiglipBlock(vit_cfg, rngs) for _ in range(vit_cfg.num_layers)])
        self.post_layernorm = LayerNorm(d, vit_cfg.layer_norm_eps)

    def __call__(self, patches: jax.Array, pos_ids: jax.Array, image_id: jax.Array) -> jax.Array:
        """patches [..., N, 3*p*p]; pos_ids, image_id [..., N] (broadcast over a batch) -> [..., N, hidden]."""
        want = 3 * self.patch_size ** 2
        if patches.shape[-1] != want:
            raise ValueError(f"ViT patches must have {want} values, got shape {patches.shape}")
        x = self.patch_embedding(patches)
        x = x + jnp.take(self.position_embedding[...], pos_ids, axis=0).astype(x.dtype)
        mask = image_attention_mask(image_id)
        for block in self.layers:
            x = block(x, mask)
        return self.post_layernorm(x)


class Connector(nnx.Module):
    """ViT features -> LLM hidden: fc1, gelu_tanh, fc2."""

    def __init__(self, vit_hidden: int, llm_hidden: int, rngs: nnx.Rngs):
        self.fc1 = Linear(vit_hidden, llm_hidden, rngs=rngs, axes=("vit_embed", "mlp"))
        self.fc2 = Linear(llm_hidden, llm_hidden, rngs=rngs, axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu_tanh(self.fc1(x)))


def vit_pos_embed_table(vit_cfg, llm_hidden: int) -> np.ndarray:
    """The fixed sin-cos table added to connector outputs: [max_patches_per_side**2, llm_hidden]."""
    return sincos_2d_table(vit_cfg.max_patches_per_side, llm_hidden)
