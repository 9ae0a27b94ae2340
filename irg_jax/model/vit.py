"""SigLIP NaViT vision encoder and the ViT -> LLM connector.

The encoder takes the packed ViT patches of a pack (any number of images of any
size, concatenated): patch vectors ordered (py, px, c), a learned position id per
patch (``row * max_patches_per_side + col``, a top-left crop of the table, no
interpolation) and an image id per patch. Attention is bidirectional within an image;
padding rows (image id -1) attend only to themselves; the mask comes from per-token
metadata, so the blockwise kernels of :mod:`irg_jax.model.attention` never build it
whole. Blocks are pre-LN, followed by a post-LayerNorm. Everything computes in the dtype of the input patches, with
LayerNorm statistics and the softmax in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from irg_jax.data.packed_batch import FULL
from irg_jax.model import attention as attn_lib
from irg_jax.model import layer_scan, remat
from irg_jax.model.attention import TokenMeta
from irg_jax.model.embeddings import Linear, sincos_2d_table
from irg_jax.parallel.sharding import constrain, param

_DENSE = {"impl": "dense", "block_q": 0, "block_k": 0}
_FIRST_PAD_DOC = -3  # below the attention kernels' own padding ids (-1 keys, -2 queries)


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


def image_token_meta(image_id: jax.Array) -> TokenMeta:
    """Attention metadata for packed ViT tokens [B, N]: one non-causal document per image.

    Gives exactly :func:`image_attention_mask` under the packed-attention rule: tokens of one
    image share a document and a FULL split; each padding row (image id < 0) is a document of
    its own (ids below the attention kernels' reserved padding ids), so it sees only itself.
    """
    image_id = jnp.asarray(image_id, jnp.int32)
    own = _FIRST_PAD_DOC - jnp.arange(image_id.shape[-1], dtype=jnp.int32)
    doc = jnp.where(image_id >= 0, image_id, own)
    return TokenMeta(doc, doc, jnp.full_like(doc, FULL), jnp.zeros_like(doc))


class SiglipAttention(nnx.Module):
    """Multi-head self-attention with biased q/k/v/out projections, masked by per-image metadata."""

    def __init__(self, hidden: int, num_heads: int, rngs: nnx.Rngs, attention=None):
        if hidden % num_heads:
            raise ValueError(f"ViT hidden {hidden} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.attn_cfg = ml_collections.FrozenConfigDict(attention or _DENSE)
        proj = dict(rngs=rngs, axes=("vit_embed", "vit_heads"))
        self.q_proj = Linear(hidden, hidden, **proj)
        self.k_proj = Linear(hidden, hidden, **proj)
        self.v_proj = Linear(hidden, hidden, **proj)
        self.out_proj = Linear(hidden, hidden, rngs=rngs, axes=("vit_heads", "vit_embed"))

    def __call__(self, x: jax.Array, meta: TokenMeta) -> jax.Array:
        """x [B, N, hidden], meta from :func:`image_token_meta`."""
        heads = lambda t: t.reshape(*t.shape[:-1], self.num_heads, self.head_dim)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = attn_lib.attend(q, k, v, meta, meta, self.attn_cfg)
        return self.out_proj(out.reshape(*x.shape[:-1], -1))


class SiglipMLP(nnx.Module):
    def __init__(self, hidden: int, intermediate: int, rngs: nnx.Rngs):
        self.fc1 = Linear(hidden, intermediate, rngs=rngs, axes=("vit_embed", "vit_mlp"))
        self.fc2 = Linear(intermediate, hidden, rngs=rngs, axes=("vit_mlp", "vit_embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu_tanh(self.fc1(x)))


class SiglipBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, vit_cfg, rngs: nnx.Rngs, attention=None):
        d = vit_cfg.hidden_size
        self.layer_norm1 = LayerNorm(d, vit_cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(d, vit_cfg.num_heads, rngs, attention)
        self.layer_norm2 = LayerNorm(d, vit_cfg.layer_norm_eps)
        self.mlp = SiglipMLP(d, vit_cfg.intermediate_size, rngs)

    def __call__(self, x: jax.Array, meta: TokenMeta) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), meta)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nnx.Module):
    """Patch embedding + learned positions, ``vit_cfg.num_layers`` blocks, post-LayerNorm.

    ``vit_cfg.num_layers`` is the number of layers actually run and stored (the
    official vit_config.json lists one more; see :func:`irg_jax.convert.vit_keys`).

    ``attention``: a ``model.attention`` config (default: the dense reference). With
    ``scan``, the blocks run as one ``lax.scan`` over their parameters stacked inside the
    call (the stored layout stays one entry per layer, as in the checkpoint); with
    ``remat_policy`` (a :mod:`irg_jax.model.remat` name) each block is rematerialised,
    so the backward pass keeps only the block inputs.
    """

    def __init__(self, vit_cfg, rngs: nnx.Rngs, *, attention=None, scan: bool = False,
                 remat_policy: str | None = None):
        d = vit_cfg.hidden_size
        p = vit_cfg.patch_size
        self.patch_size = p
        self.max_patches_per_side = vit_cfg.max_patches_per_side
        self.scan = scan
        self.remat_policy = remat_policy
        self.patch_embedding = Linear(p * p * 3, d, rngs=rngs, axes=("patch", "vit_embed"))
        num_pos = vit_cfg.max_patches_per_side ** 2
        self.position_embedding = param(jax.random.normal(rngs.params(), (num_pos, d), jnp.float32) * 0.02,
                                        (None, "vit_embed"))
        self.layers = nnx.List([SiglipBlock(vit_cfg, rngs, attention) for _ in range(vit_cfg.num_layers)])
        self.post_layernorm = LayerNorm(d, vit_cfg.layer_norm_eps)

    def __call__(self, patches: jax.Array, pos_ids: jax.Array, image_id: jax.Array) -> jax.Array:
        """patches [B, N, 3*p*p]; pos_ids, image_id [B, N] (or all without B) -> [B, N, hidden]."""
        want = 3 * self.patch_size ** 2
        if patches.shape[-1] != want:
            raise ValueError(f"ViT patches must have {want} values, got shape {patches.shape}")
        if patches.ndim == 2:  # one unbatched pack
            return self(patches[None], jnp.asarray(pos_ids)[None], jnp.asarray(image_id)[None])[0]
        x = self.patch_embedding(patches)
        x = x + jnp.take(self.position_embedding[...], pos_ids, axis=0).astype(x.dtype)
        x = constrain(x, ("batch", "length", "vit_embed"))
        meta = image_token_meta(jnp.broadcast_to(image_id, x.shape[:-1]))

        def block(state, graphdef, h, meta):
            return constrain(nnx.merge(graphdef, state)(h, meta), ("batch", "length", "vit_embed"))

        run = remat.checkpoint(block, self.remat_policy, static_argnums=(1,))
        if self.scan and len(self.layers):
            graphdef = nnx.graphdef(self.layers[0])
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(b) for b in self.layers))
            if self.remat_policy == "nothing_saveable":  # inputs saved in the compute dtype
                x = layer_scan.scan_layers(lambda state, h, meta: block(state, graphdef, h, meta),
                                           ("batch", "length", "vit_embed"), 1, stacked, x, meta)
            else:
                x, _ = jax.lax.scan(lambda h, state: (run(state, graphdef, h, meta), None), x, stacked)
        else:
            for block in self.layers:
                graphdef, state = nnx.split(block)
                x = run(state, graphdef, x, meta)
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
