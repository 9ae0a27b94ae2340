"""The packed-batch layout: the contract between the data pipeline and the model.

One *pack* holds several samples (documents) laid out in a fixed token budget. The
official BAGEL code keeps the pack in sequence order and routes tokens to the two
MoT experts with index lists; here the pack is stored **expert-sorted** so that each
expert is a static slice and never runs on the other expert's tokens:

    tokens [0, und_len)               understanding expert: text, image markers, ViT
    tokens [und_len, und_len+gen_len) generation expert: VAE latent tokens (noisy or clean)

Within each section tokens keep their sequence order. ``seq_pos`` gives every token
its index in the logical (official, unsorted) pack, so the attention rule "k <= q" is
evaluated on logical order, not on storage order. Padding tokens have ``kind == PAD``
and form their own causal document (``doc_id == PAD_DOC``).

Every array has a leading batch axis ``B`` (packs per step) when batched; the shapes
below are per pack. All budgets are static (from ``config.data.pack``), so a train step
compiles once per image-size bucket.

Sequence arrays, length ``L = und_len + gen_len``:
  text_ids   int32  token id for text and marker tokens; 0 elsewhere
  kind       int32  PAD=0, TEXT=1 (incl. <|vision_start|>/<|vision_end|>), VIT=2, LATENT=3
  doc_id     int32  sample index within the pack; PAD_DOC for padding
  split_id   int32  split index, unique within the pack, increasing in logical order
  split_mode int32  CAUSAL=0 (text), FULL=1 (clean VAE or ViT image), NOISE=2 (noisy VAE)
  seq_pos    int32  logical position in the pack (0..n-1); padding continues past n
  rope_pos   int32  RoPE position (restarts at 0 per sample; one position per image)

ViT patches, budget ``vit_len`` (tokens of all ViT images of the pack, in order):
  vit_patches   f32 [vit_len, 3*p*p]  patch vectors ordered (py, px, c), pixels in [-1, 1]
  vit_pos_ids   int32 [vit_len]       row * vit_max_patches_per_side + col
  vit_image_id  int32 [vit_len]       image index for ViT-internal attention; -1 padding
  vit_dest      int32 [vit_len]       index in [0, und_len) receiving the connector output;
                                      padding rows point at und_len-1 with vit_image_id -1

VAE images, budget ``num_vae_images`` of size ``vae_image_size`` (an image-size bucket):
  vae_images        f32 [num_vae_images, H, W, 3]  pixels in [-1, 1], zero-padded
  latent_src        int32 [gen_len]  flat index into the patchified latents
                                     image * (hmax*wmax) + row * wmax + col, with
                                     hmax = H/16, wmax = W/16; padding -> 0
  latent_pos_ids    int32 [gen_len]  row * max_latent_size + col
  latent_t          f32  [gen_len]   flow time after the shift; 0 for clean images and padding
  latent_noisy      bool [gen_len]   token is a noisy generation target (MSE position)
  latent_bridge_src int32 [gen_len]  like ``latent_src``, the clean latent a bridged target
                                     starts from (``packing.py``: refinement bridge); 0 if none
  latent_bridge_w   f32  [gen_len]   noise = eps + w * (x_bridge - x0); 0 if none

Loss positions (static budgets):
  ce_index   int32 [ce_len]   index into [0, L) of a position that predicts a label
  ce_labels  int32 [ce_len]   the label
  ce_valid   bool  [ce_len]   False for padding rows
"""
from __future__ import annotations

import dataclasses

import numpy as np

PAD, TEXT, VIT, LATENT = 0, 1, 2, 3
CAUSAL, FULL, NOISE = 0, 1, 2
PAD_DOC = 2**30


@dataclasses.dataclass(frozen=True)
class PackBudgets:
    """Static sizes of one pack; all arrays of a pack derive their shapes from these."""

    und_len: int
    gen_len: int
    vit_len: int
    ce_len: int
    num_vae_images: int
    vae_image_size: tuple[int, int]  # (H, W) bucket, multiples of 16
    vit_patch_dim: int = 3 * 14 * 14

    @property
    def seq_len(self) -> int:
        return self.und_len + self.gen_len


def array_specs(b: PackBudgets) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every field of one pack."""
    L = b.seq_len
    H, W = b.vae_image_size
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    return {
        "text_ids": ((L,), i32),
        "kind": ((L,), i32),
        "doc_id": ((L,), i32),
        "split_id": ((L,), i32),
        "split_mode": ((L,), i32),
        "seq_pos": ((L,), i32),
        "rope_pos": ((L,), i32),
        "vit_patches": ((b.vit_len, b.vit_patch_dim), f32),
        "vit_pos_ids": ((b.vit_len,), i32),
        "vit_image_id": ((b.vit_len,), i32),
        "vit_dest": ((b.vit_len,), i32),
        "vae_images": ((b.num_vae_images, H, W, 3), f32),
        "latent_src": ((b.gen_len,), i32),
        "latent_pos_ids": ((b.gen_len,), i32),
        "latent_t": ((b.gen_len,), f32),
        "latent_noisy": ((b.gen_len,), np.dtype(bool)),
        "latent_bridge_src": ((b.gen_len,), i32),
        "latent_bridge_w": ((b.gen_len,), f32),
        "ce_index": ((b.ce_len,), i32),
        "ce_labels": ((b.ce_len,), i32),
        "ce_valid": ((b.ce_len,), np.dtype(bool)),
    }


def empty_pack(b: PackBudgets) -> dict[str, np.ndarray]:
    """An all-padding pack with the right shapes (padding is its own document)."""
    out = {k: np.zeros(s, d) for k, (s, d) in array_specs(b).items()}
    L = b.seq_len
    out["doc_id"][:] = PAD_DOC
    out["split_id"][:] = np.iinfo(np.int32).max
    out["seq_pos"][:] = np.arange(L)
    out["vit_image_id"][:] = -1
    out["vit_dest"][:] = b.und_len - 1
    return out


def check_pack(pack: dict[str, np.ndarray], b: PackBudgets) -> None:
    """Raise ValueError naming the field if a pack does not match the budgets."""
    specs = array_specs(b)
    missing = sorted(set(specs) - set(pack))
    if missing:
        raise ValueError(f"pack is missing fields {missing}")
    for k, (shape, dtype) in specs.items():
        a = np.asarray(pack[k])
        if a.shape[-len(shape):] != shape or a.dtype != dtype:
            raise ValueError(f"pack field {k!r}: got {a.shape} {a.dtype}, want {shape} {dtype}")
