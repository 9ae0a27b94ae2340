"""The unified BAGEL model: MoT decoder + SigLIP/connector + latent embedding + heads.

Training forward on an expert-sorted packed batch (``irg_jax.data.packed_batch``):

  text/marker tokens  embed_tokens[id]
  ViT tokens          connector(SigLIP(patches)) + vit_table[vit_pos_ids], scattered to vit_dest
  latent tokens       vae2llm(x_t) + time_embedder(t) + latent_table[latent_pos_ids],
                      x_t = (1 - t) x0 + t eps (clean tokens have t = 0)

returns ``ce_logits`` at ``ce_index``, the predicted ``velocity`` (llm2vae) at every gen
token and the flow ``target`` eps - x0. The two 2-D sin-cos tables are rebuilt from the
config and held as :class:`FixedTable` variables (not ``nnx.Param``: never trained,
never loaded).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from irg_jax.data.packed_batch import TEXT
from irg_jax.model import remat
from irg_jax.model.autoencoder import FluxAutoEncoder, posterior_eps
from irg_jax.model.attention import TokenMeta
from irg_jax.model.config import latent_token_dim
from irg_jax.model.decoder import Decoder
from irg_jax.data.transforms import patchify
from irg_jax.model.embeddings import Linear, TimestepEmbedder, sincos_2d_table
from irg_jax.model.vit import Connector, SiglipEncoder
from irg_jax.parallel.sharding import constrain, logical_metadata


class FixedTable(nnx.Variable):
    """A constant table rebuilt from the config (sin-cos positions); excluded from nnx.Param filters."""


class Bagel(nnx.Module):
    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        cfg = ml_collections.FrozenConfigDict(model_cfg)
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        d = cfg.llm.hidden_size
        d_lat = latent_token_dim(cfg)
        self.decoder = Decoder(cfg, rngs=rngs)
        if cfg.vit.enabled:
            self.vit = SiglipEncoder(cfg.vit, rngs, attention=cfg.attention, scan=bool(cfg.scan_layers),
                                     remat_policy=remat.policy_name(cfg))
            self.connector = Connector(cfg.vit.hidden_size, d, rngs)
            self.vit_pos_table = FixedTable(jnp.asarray(sincos_2d_table(cfg.vit.max_patches_per_side, d)),
                                            **logical_metadata((None, "embed")))
        else:
            self.vit = self.connector = self.vit_pos_table = None
        self.time_embedder = TimestepEmbedder(d, rngs, scale=cfg.latent.get("time_scale", 1.0))
        self.vae2llm = Linear(d_lat, d, rngs=rngs, axes=("patch", "embed"))
        self.llm2vae = Linear(d, d_lat, rngs=rngs, axes=("embed", "patch"), kernel_init=nnx.initializers.zeros)
        self.latent_pos_table = FixedTable(jnp.asarray(sincos_2d_table(cfg.latent.max_latent_size, d)),
                                           **logical_metadata((None, "embed")))

    def rebuild_tables(self) -> None:
        """Recompute the fixed sin-cos tables (after merging an abstract model with loaded params)."""
        d = self.cfg.llm.hidden_size
        self.latent_pos_table.set_value(jnp.asarray(sincos_2d_table(self.cfg.latent.max_latent_size, d)))
        if self.vit_pos_table is not None:
            self.vit_pos_table.set_value(jnp.asarray(sincos_2d_table(self.cfg.vit.max_patches_per_side, d)))

    # ------------------------------------------------------------------ token embeddings
    def embed_text(self, ids: jax.Array) -> jax.Array:
        return self.decoder.embed_tokens(ids).astype(self.dtype)

    def embed_vit(self, patches: jax.Array, pos_ids: jax.Array, image_id: jax.Array) -> jax.Array:
        """ViT patches [B, N, 3p^2] -> LLM tokens [B, N, D]."""
        if self.vit is None:
            raise ValueError("model.vit.enabled is False but the input has ViT tokens")
        feats = self.connector(self.vit(patches.astype(self.dtype), pos_ids, image_id))
        return feats + jnp.take(self.vit_pos_table[...], pos_ids, axis=0).astype(self.dtype)

    def embed_latents(self, x_t: jax.Array, t: jax.Array, pos_ids: jax.Array) -> jax.Array:
        """Noisy (or clean, t=0) latent tokens [B, N, D_lat], times [B, N] -> LLM tokens [B, N, D]."""
        t = constrain(t, ("batch", "length"))
        h = self.vae2llm(x_t.astype(self.dtype)) + self.time_embedder(t, self.dtype)
        return h + jnp.take(self.latent_pos_table[...], pos_ids, axis=0).astype(self.dtype)

    def velocity(self, h_gen: jax.Array) -> jax.Array:
        """llm2vae on gen-expert hidden states, float32."""
        return self.llm2vae(h_gen).astype(jnp.float32)

    def ce_sum(self, ce_hidden: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
        """Sum of next-token CEs over valid positions, lm_head applied ``cfg.ce_chunk`` tokens at a time."""
        return chunked_ce_sum(ce_hidden, self.decoder.lm_head.kernel[...], labels, valid,
                              int(self.cfg.get("ce_chunk", 0)))

    # ------------------------------------------------------------------ training forward
    def __call__(self, pack: dict, x0_tokens: jax.Array, noise: jax.Array, *,
                 collect_layer_outputs: bool = False) -> dict:
        """Training forward on a batch of packs (arrays with a leading batch axis).

        x0_tokens, noise: [B, gen_len, D_lat] clean latent tokens (see
        :func:`gather_latent_tokens`) and the flow noise. Returns ``ce_logits``
        [B, ce_len, V] (float32), ``velocity`` and ``target`` [B, gen_len, D_lat] (float32).
        """
        text_ids = pack["text_ids"]
        b, seq_len = text_ids.shape
        gen_len = pack["latent_src"].shape[-1]
        und_len = seq_len - gen_len
        if x0_tokens.shape[:2] != (b, gen_len) or noise.shape != x0_tokens.shape:
            raise ValueError(f"x0_tokens {x0_tokens.shape} / noise {noise.shape} do not match the pack's "
                             f"[batch {b}, gen_len {gen_len}, D_lat]")

        is_text = (pack["kind"][:, :und_len] == TEXT)[..., None]
        h_und = jnp.where(is_text, self.embed_text(text_ids[:, :und_len]), 0).astype(self.dtype)
        h_und = constrain(h_und, ("batch", "length", "embed"))
        if pack["vit_patches"].shape[1] > 0:
            if self.vit is None:
                raise ValueError(f"the pack has a ViT budget of {pack['vit_patches'].shape[1]} tokens but "
                                 "model.vit.enabled is False")
            image_id = pack["vit_image_id"]
            feats = self.embed_vit(pack["vit_patches"], pack["vit_pos_ids"], image_id)
            dest = jnp.where(image_id >= 0, pack["vit_dest"], und_len)  # padding rows are dropped
            feats = constrain(feats.astype(self.dtype), ("batch", "length", "embed"))
            # A scatter per pack (vmapped: the batch axis stays a batch axis of the scatter, so
            # it is partitioned over the batch axes instead of gathered to the global batch).
            h_und = jax.vmap(lambda h, d, f: h.at[d].set(f, mode="drop"))(h_und, dest, feats)
            h_und = constrain(h_und, ("batch", "length", "embed"))

        # Batch-dimension activations stay on the batch axes (else every device embeds the
        # latents of the whole global batch).
        t = pack["latent_t"].astype(jnp.float32)
        x0 = constrain(x0_tokens.astype(jnp.float32), ("batch", "length", None))
        eps = constrain(noise.astype(jnp.float32), ("batch", "length", None))
        x_t = (1.0 - t[..., None]) * x0 + t[..., None] * eps
        h_gen = constrain(self.embed_latents(x_t, t, pack["latent_pos_ids"]), ("batch", "length", "embed"))

        h = jnp.concatenate([h_und, h_gen], axis=1)
        h = constrain(h, ("batch", "length", "embed"))
        meta = TokenMeta(pack["doc_id"], pack["split_id"], pack["split_mode"], pack["seq_pos"])
        out = self.decoder(h, pack["rope_pos"], meta, und_len, collect_layer_outputs=collect_layer_outputs,
                           with_kv=False)

        ce_hidden = jnp.take_along_axis(out.hidden, pack["ce_index"][..., None], axis=1)
        result = {
            # Under jit, whatever the caller does not use is dropped: the train step reads
            # ``ce_hidden`` (chunked CE, see ce_sum), tests and probes read the logits.
            "ce_hidden": ce_hidden,
            "ce_logits": constrain(self.decoder.logits(ce_hidden), ("batch", None, "vocab")),
            "velocity": self.velocity(out.hidden[:, und_len:]),
            "target": eps - x0,
        }
        if collect_layer_outputs:
            result.update(llm_input=h, layer_outputs=out.layer_outputs, hidden=out.hidden)
        return result


def chunked_ce_sum(hidden: jax.Array, kernel: jax.Array, labels: jax.Array, valid: jax.Array,
                   chunk: int) -> jax.Array:
    """Sum of CEs of ``hidden @ kernel`` (fp32 logits) over valid positions, ``chunk`` tokens at a time.

    hidden [B, N, D], kernel [D, V], labels/valid [B, N]. With ``chunk`` > 0 and N > chunk the
    tokens run through a scan whose body is rematerialised: the [B, chunk, V] logits exist
    for one chunk at a time in the forward and the backward pass (a 7B pack's 8192 CE
    tokens x 152064 vocab would be 4.6 GiB of fp32 logits at once).

    On a mesh the CE is vocab-parallel over the devices that hold the batch: each chunk's
    hidden states (small) are gathered over the batch axes, the kernel is split along the
    vocabulary over the same axes (once, in the compute dtype), so each device computes
    the logits of all packs for its slice of the vocabulary, and the log-sum-exp and the
    label logit are reduced across devices. No device ever holds the full [D, V] kernel or
    its fp32 gradient (2 GiB each at 7B); the per-device work stays 1/N of the total.
    """
    k = constrain(kernel.astype(hidden.dtype), (None, "batch"))

    def part(h, y, m):
        h, y, m = (constrain(x, (None,) * x.ndim) for x in (h, y, m))
        logits = jnp.einsum("bnd,dv->bnv", h, k, preferred_element_type=jnp.float32)
        logits = constrain(logits, (None, None, "batch"))
        lse = jax.nn.logsumexp(logits, axis=-1)
        is_label = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == y[..., None]
        picked = jnp.sum(jnp.where(is_label, logits, 0.0), axis=-1)
        return jnp.sum(jnp.where(m, lse - picked, 0.0))

    b, n, d = hidden.shape
    if labels.shape != (b, n) or kernel.shape[0] != d:
        raise ValueError(f"chunked_ce_sum: hidden {hidden.shape}, kernel {kernel.shape}, labels {labels.shape}")
    if not chunk or n <= chunk:
        return part(hidden, labels, valid)
    num = -(-n // chunk)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, num * chunk - n)] + [(0, 0)] * (x.ndim - 2))
    blocks = lambda x: pad(x).reshape(b, num, chunk, *x.shape[2:]).swapaxes(0, 1)
    body = jax.checkpoint(lambda acc, xs: (acc + part(*xs), None))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (blocks(hidden), blocks(labels), blocks(valid)))
    return total


def latent_tokens(ae, vae_images: jax.Array, posterior_noise, patch_size: int) -> jax.Array:
    """AE-encode a batch of image slots and patchify: [B, N, H, W, 3] -> [B, N*(H/16)*(W/16), D_lat].

    ``posterior_noise`` is a PRNG key or eps of shape [B*N, H/d, W/d, z] (ignored by the
    identity AE). Token order is image-major, then row-major over the (H/16, W/16) grid,
    which is what ``latent_src`` indexes.

    The N slots are encoded one at a time (a ``lax.map`` over slots, each step encoding one
    image per pack, batch-sharded): the AE's full-resolution activations exist for one
    image per pack at a time. The noise of all slots is drawn up front from the key, as one
    array, so the latents do not depend on this loop.
    """
    b, n, hh, ww, c = vae_images.shape
    images = constrain(jnp.swapaxes(vae_images, 0, 1), (None, "batch", None, None, None))  # [N, B, H, W, 3]
    noise = posterior_noise
    if isinstance(ae, FluxAutoEncoder):
        d = ae.downsample
        latent_shape = (b * n, hh // d, ww // d, ae.z_channels)
        eps = posterior_eps(posterior_noise, latent_shape).reshape(b, n, *latent_shape[1:])
        noise = constrain(jnp.swapaxes(eps, 0, 1), (None, "batch", None, None, None))

        def encode(xs):
            return patchify(ae.encode(xs[0], xs[1]), patch_size)

        tokens = jax.lax.map(encode, (images, noise))  # [N, B, T, D_lat]
    else:
        tokens = jax.lax.map(lambda x: patchify(ae.encode(x, noise), patch_size), images)
    tokens = constrain(jnp.swapaxes(tokens, 0, 1), ("batch", None, None, None))
    return tokens.reshape(b, -1, tokens.shape[-1])


def gather_latent_tokens(tokens: jax.Array, latent_src: jax.Array) -> jax.Array:
    """Pick each gen token's clean latent: tokens [B, M, D_lat], latent_src [B, gen_len] -> [B, gen_len, D_lat]."""
    return jnp.take_along_axis(tokens, latent_src[..., None].astype(jnp.int32), axis=1)


# ---------------------------------------------------------------------- FLOPs

def forward_flops(model_cfg, *, batch: int, und_len: int, gen_len: int, vit_len: int, ce_len: int) -> dict:
    """Analytic matmul FLOPs of one training forward (2 per multiply-add), by component.

    Each expert's projections and MLP count only its own tokens (und_len / gen_len).
    Attention counts the full [L, L] score and value products per pack, which is what the
    blockwise kernel computes at most (it may skip fully masked blocks); the ViT
    attention is dense over the pack's ViT tokens. The backward costs about twice the
    forward: training ≈ 3x.
    """
    llm, vit = model_cfg.llm, model_cfg.vit
    d, hq, hk, hd, f = llm.hidden_size, llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.intermediate_size
    seq = und_len + gen_len
    d_lat = latent_token_dim(model_cfg)
    per_token_layer = 2 * d * (hq + 2 * hk) * hd + 2 * hq * hd * d + 2 * 3 * d * f
    out = {
        "llm_projections_mlp": batch * llm.num_layers * seq * per_token_layer,
        "llm_attention": batch * llm.num_layers * 4 * seq * seq * hq * hd,
        "lm_head": batch * 2 * ce_len * d * llm.vocab_size,
        "latent_io": batch * gen_len * (2 * d_lat * d + 2 * d * d_lat + 2 * 256 * d + 2 * d * d),
    }
    if vit.enabled and vit_len:
        dv, fv, p = vit.hidden_size, vit.intermediate_size, vit.patch_size
        out["vit"] = batch * (2 * vit_len * 3 * p * p * dv + vit.num_layers * (
            vit_len * (2 * 4 * dv * dv + 2 * 2 * dv * fv) + 4 * vit_len * vit_len * dv))
        out["connector"] = batch * vit_len * (2 * dv * d + 2 * d * d)
    out["total"] = sum(out.values())
    return out


def training_flops(model_cfg, **shapes) -> int:
    """Forward + backward model FLOPs of one training step (3x the forward)."""
    return 3 * forward_flops(model_cfg, **shapes)["total"]


def recompute_flops(model_cfg, **shapes) -> float:
    """FLOPs that rematerialisation adds to a training step (on top of :func:`training_flops`).

    With ``remat`` the backward re-runs each decoder layer and ViT block once (an upper bound
    for the policies that save matmul outputs); with scanned layers under ``nothing_saveable``
    and ``layers_per_save = k`` the decoder's backward first re-runs k - 1 of every k layers to
    recover their inputs (:mod:`irg_jax.model.layer_scan`), (k - 1) / k more decoder forwards.
    """
    policy = remat.policy_name(model_cfg)
    if policy == "none":
        return 0.0
    f = forward_flops(model_cfg, **shapes)
    decoder = f["llm_projections_mlp"] + f["llm_attention"]
    scanned = model_cfg.get("scan_layers", False) and policy == "nothing_saveable"
    k = int(model_cfg.get("layers_per_save", 1)) if scanned else 1
    return float(decoder * (1 + (k - 1) / k) + f.get("vit", 0))


def param_count(model_cfg) -> int:
    """Number of trainable parameters (from ``eval_shape``; nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: Bagel(model_cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
