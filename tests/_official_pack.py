"""Convert an official BAGEL packed batch (the kwargs of ``Bagel.forward``) into our layout.

The official pack is in sequence order with index lists per token type; ours is
expert-sorted ``[und | gen]`` with per-token metadata (``irg_jax.data.packed_batch``).
Used by the parity tests (tests/fixtures/bagel_tiny Reference A) and handy for checking
a data pipeline against official packing.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from irg_jax.data import packed_batch as pb

_MODES = {"causal": pb.CAUSAL, "full": pb.FULL, "noise": pb.NOISE}


def shifted_timesteps(u: np.ndarray, shift: float) -> np.ndarray:
    """Official training time: t = sigmoid(u) (u = -inf for clean images gives 0), then s t / (1 + (s-1) t)."""
    t = 1.0 / (1.0 + np.exp(-np.asarray(u, np.float64)))
    return (shift * t / (1.0 + (shift - 1.0) * t)).astype(np.float32)


def pack_from_official(ref: Mapping[str, np.ndarray], split_lens: Sequence[Sequence[int]],
                       attn_modes: Sequence[Sequence[str]], *, timestep_shift: float, pixels_per_token: int,
                       budgets: pb.PackBudgets | None = None) -> tuple[dict[str, np.ndarray], pb.PackBudgets, np.ndarray]:
    """Official kwargs + per-sample split plans -> (our pack, its budgets, storage index of each sequence index).

    ``ref`` holds ``sequence_length``, ``sample_lens``, ``packed_text_ids/_indexes``,
    ``packed_position_ids``, ``packed_vit_tokens/_position_ids/_token_indexes``,
    ``vit_token_seqlens``, ``padded_images`` (N, 3, H, W), ``patchified_vae_latent_shapes``,
    ``packed_latent_position_ids``, ``packed_vae_token_indexes``, ``packed_timesteps``
    (raw u), ``mse_loss_indexes``, ``ce_loss_indexes``, ``packed_label_ids``.
    ``budgets`` may add padding; by default every budget is exact.
    """
    n = int(ref["sequence_length"])
    text_idx = np.asarray(ref["packed_text_indexes"])
    vit_idx = np.asarray(ref.get("packed_vit_token_indexes", np.zeros(0, np.int64)))
    vae_idx = np.asarray(ref["packed_vae_token_indexes"])
    und_idx = np.sort(np.concatenate([text_idx, vit_idx]))
    if not np.array_equal(np.sort(np.concatenate([und_idx, vae_idx])), np.arange(n)):
        raise ValueError("official pack: text, ViT and VAE indexes do not partition the sequence")
    if np.any(np.diff(vae_idx) <= 0):
        raise ValueError("official pack: packed_vae_token_indexes is not increasing")
    images = np.transpose(np.asarray(ref["padded_images"], np.float32), (0, 2, 3, 1))
    ce_idx = np.asarray(ref["ce_loss_indexes"])
    if budgets is None:
        budgets = pb.PackBudgets(und_len=len(und_idx), gen_len=len(vae_idx), vit_len=len(vit_idx),
                                 ce_len=len(ce_idx), num_vae_images=images.shape[0],
                                 vae_image_size=images.shape[1:3],
                                 vit_patch_dim=np.shape(ref.get("packed_vit_tokens", np.zeros((0, 588))))[-1])
    if (budgets.und_len < len(und_idx) or budgets.gen_len < len(vae_idx) or budgets.vit_len < len(vit_idx)
            or budgets.ce_len < len(ce_idx) or budgets.num_vae_images < images.shape[0]):
        raise ValueError(f"official pack does not fit budgets {budgets}")
    pack = pb.empty_pack(budgets)
    U, L = budgets.und_len, budgets.seq_len

    # storage position of each sequence index; padding continues the logical positions past n
    storage = np.empty(n, np.int64)
    storage[und_idx] = np.arange(len(und_idx))
    storage[vae_idx] = U + np.arange(len(vae_idx))
    pad_slots = np.setdiff1d(np.arange(L), storage)
    pack["seq_pos"][storage] = np.arange(n)
    pack["seq_pos"][pad_slots] = n + np.arange(len(pad_slots))

    doc = np.repeat(np.arange(len(ref["sample_lens"])), ref["sample_lens"])
    split_id = np.repeat(np.arange(sum(len(s) for s in split_lens)), [x for s in split_lens for x in s])
    modes = np.repeat([_MODES[m] for s in attn_modes for m in s], [x for s in split_lens for x in s])
    if len(doc) != n or len(split_id) != n:
        raise ValueError(f"official pack: sample_lens / split_lens cover {len(doc)} / {len(split_id)} tokens, "
                         f"sequence_length is {n}")
    pack["doc_id"][storage] = doc
    pack["split_id"][storage] = split_id
    pack["split_mode"][storage] = modes
    pack["rope_pos"][storage] = np.asarray(ref["packed_position_ids"])
    pack["kind"][storage[text_idx]] = pb.TEXT
    pack["kind"][storage[vit_idx]] = pb.VIT
    pack["kind"][storage[vae_idx]] = pb.LATENT
    pack["text_ids"][storage[text_idx]] = np.asarray(ref["packed_text_ids"])

    nv = len(vit_idx)
    if nv:
        pack["vit_patches"][:nv] = np.asarray(ref["packed_vit_tokens"], np.float32)
        pack["vit_pos_ids"][:nv] = np.asarray(ref["packed_vit_position_ids"])
        pack["vit_image_id"][:nv] = np.repeat(np.arange(len(ref["vit_token_seqlens"])), ref["vit_token_seqlens"])
        pack["vit_dest"][:nv] = storage[vit_idx]

    h_img, w_img = budgets.vae_image_size
    pack["vae_images"][:images.shape[0], :images.shape[1], :images.shape[2]] = images
    hmax, wmax = h_img // pixels_per_token, w_img // pixels_per_token
    src = []
    for i, (h, w) in enumerate(np.asarray(ref["patchified_vae_latent_shapes"])):
        rows, cols = np.divmod(np.arange(h * w), w)
        src.append(i * hmax * wmax + rows * wmax + cols)
    src = np.concatenate(src)
    g = len(vae_idx)
    if len(src) != g:
        raise ValueError(f"official pack: latent shapes give {len(src)} tokens, {g} VAE indexes")
    pack["latent_src"][:g] = src
    pack["latent_pos_ids"][:g] = np.asarray(ref["packed_latent_position_ids"])
    pack["latent_t"][:g] = shifted_timesteps(ref["packed_timesteps"], timestep_shift)
    pack["latent_noisy"][:g] = np.isin(vae_idx, np.asarray(ref["mse_loss_indexes"]))

    nc = len(ce_idx)
    pack["ce_index"][:nc] = storage[ce_idx]
    pack["ce_labels"][:nc] = np.asarray(ref["packed_label_ids"])
    pack["ce_valid"][:nc] = True
    pb.check_pack(pack, budgets)
    return pack, budgets, storage
