"""Generated latents -> pixels -> the two conditioning copies IRG feeds back (spec §6.5).

IRG decodes a generated image to a uint8 picture (``decode_image``: truncation of
``clamp(x/2 + 1/2, 0, 1) * 255``), then re-reads that picture through two transforms:

  VAE copy  ImageTransform(1024, 512, 16): identity for IRG's 1024 x 1024 images, so it is
            the generated resolution here; re-encoded with a *sampled* posterior and
            appended as a clean image (t = 0, gen expert).
  ViT copy  ImageTransform(980, 224, 14): resized (bicubic, antialiased) to the
            stride-aligned size of :func:`vit_size`, patchified, run through SigLIP.

Everything here is on device. The bicubic resize is ``jax.image.resize`` on the uint8
levels (rounded back to uint8), close to but not bit-identical with PIL's.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from irg_jax.data.transforms import grid_position_ids, irg_target_size, patchify
from irg_jax.model.embeddings import unpatchify_latents

IRG_VIT_MAX_SIZE, IRG_VIT_MIN_SIZE = 980, 224


class ImageGrid(NamedTuple):
    """Static geometry of generated images of one size, for one model config."""

    height: int
    width: int
    latent_h: int        # latent token grid (one token = pixels_per_token^2 pixels)
    latent_w: int
    latent_pos: np.ndarray   # int32 [latent_h * latent_w]: row * max_latent_size + col
    vit_height: int
    vit_width: int
    vit_pos: np.ndarray      # int32 [num ViT patches]: row * max_patches_per_side + col

    @property
    def num_latent_tokens(self) -> int:
        return self.latent_h * self.latent_w

    @property
    def num_vit_tokens(self) -> int:
        return len(self.vit_pos)


def pixels_per_token(model_cfg) -> int:
    return model_cfg.autoencoder.downsample * model_cfg.latent.patch_size


def vit_size(model_cfg, height: int, width: int, max_size: int | None = None,
             min_size: int | None = None) -> tuple[int, int]:
    """(H, W) of the ViT copy: IRG's ImageTransform(980, 224, 14) with both limits capped at
    the model's position table (``max_patches_per_side * patch_size``)."""
    vit = model_cfg.vit
    table = vit.max_patches_per_side * vit.patch_size
    hi = min(max_size or IRG_VIT_MAX_SIZE, table)
    lo = min(min_size or IRG_VIT_MIN_SIZE, hi)
    w, h = irg_target_size(width, height, hi, lo, vit.patch_size)
    return h, w


def image_grid(model_cfg, height: int, width: int, vit_max_size: int | None = None,
               vit_min_size: int | None = None) -> ImageGrid:
    px = pixels_per_token(model_cfg)
    if height % px or width % px:
        raise ValueError(f"image size {height}x{width} must be a multiple of {px} pixels (one latent token)")
    lh, lw = height // px, width // px
    side = model_cfg.latent.max_latent_size
    if lh > side or lw > side:
        raise ValueError(f"image size {height}x{width} needs a {lh}x{lw} latent grid; the model's latent "
                         f"position table is {side}x{side} (max {side * px} px per side)")
    latent_pos = grid_position_ids(lh, lw, 1, side)
    if model_cfg.vit.enabled:
        vh, vw = vit_size(model_cfg, height, width, vit_max_size, vit_min_size)
        vit_pos = grid_position_ids(vh, vw, model_cfg.vit.patch_size, model_cfg.vit.max_patches_per_side)
    else:
        vh = vw = 0
        vit_pos = np.zeros((0,), np.int32)
    return ImageGrid(height, width, lh, lw, latent_pos, vh, vw, vit_pos)


def to_uint8(images: jax.Array) -> jax.Array:
    """Decoder output [..., 3] in about [-1, 1] -> uint8, truncating like BAGEL's decode_image."""
    return jnp.floor(jnp.clip(images * 0.5 + 0.5, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def to_unit_range(u8: jax.Array) -> jax.Array:
    """uint8 -> float32 in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    return (u8.astype(jnp.float32) / 255.0 - 0.5) / 0.5


def decode_latents(ae, tokens: jax.Array, grid: ImageGrid, model_cfg) -> jax.Array:
    """Latent tokens [B, N, D_lat] -> decoded images [B, H, W, 3] (float32, unclamped)."""
    p, z = model_cfg.latent.patch_size, model_cfg.autoencoder.z_channels
    return ae.decode(unpatchify_latents(tokens, grid.latent_h, grid.latent_w, p, z))


def vae_tokens(ae, u8: jax.Array, posterior_noise, model_cfg) -> jax.Array:
    """uint8 images [B, H, W, 3] -> clean latent tokens [B, N, D_lat] (sampled posterior)."""
    return patchify(ae.encode(to_unit_range(u8), posterior_noise), model_cfg.latent.patch_size)


def vit_patches(u8: jax.Array, grid: ImageGrid, patch_size: int) -> jax.Array:
    """uint8 images [B, H, W, 3] -> ViT patch vectors [B, Np, 3 p^2] of the resized copy."""
    x = u8.astype(jnp.float32)
    if (grid.vit_height, grid.vit_width) != (grid.height, grid.width):
        shape = (x.shape[0], grid.vit_height, grid.vit_width, 3)
        x = jnp.clip(jnp.round(jax.image.resize(x, shape, "bicubic", antialias=True)), 0, 255)
    return patchify(to_unit_range(x), patch_size)
