"""Build an expert-sorted pack from a short list of segments (tests and benchmarks).

A segment is ``(doc, kind, payload)`` in logical order:

  ('text',  ids)       text tokens (including their bos/eos), causal
  ('vit',   n)         a ViT image of n patches, wrapped in soi/eoi, full
  ('clean', n)         a clean VAE image of n latent tokens, wrapped in soi/eoi, full
  ('noisy', n)         a noisy VAE target of n latent tokens, wrapped in soi/eoi, noise

RoPE positions restart at 0 per document and follow spec §2.6 (an image is one
position; the counter does not advance after a noisy image). Latent tokens are numbered
in order (``latent_src`` = 0, 1, ...), ViT tokens all belong to image 0 of their
document order, and ``ce_index`` lists every und token (so logits exist everywhere).
The data pipeline has its own packer; this one only serves hand-built sequences.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from irg_jax.data import packed_batch as pb


def pack_from_segments(segments: Sequence[tuple[int, str, object]], model_cfg, *, vae_image_size=(16, 16),
                       pad_und: int = 0, pad_gen: int = 0) -> tuple[dict[str, np.ndarray], pb.PackBudgets, np.ndarray]:
    """-> (pack, budgets, order) where ``order[s]`` is the logical index of storage slot s."""
    sids = model_cfg.special_ids
    rows = []  # (doc, kind, text_id, split, mode, rope, expert, vit_image)
    rope, last_doc, vit_images = 0, None, 0
    for split, (doc, kind, payload) in enumerate(segments):
        if doc != last_doc:
            rope, last_doc = 0, doc
        if kind == "text":
            rows += [(doc, pb.TEXT, int(t), split, pb.CAUSAL, rope + i, "und", -1) for i, t in enumerate(payload)]
            rope += len(payload)
            continue
        if kind not in ("vit", "clean", "noisy"):
            raise ValueError(f"segment {split}: unknown kind {kind!r}")
        mode = pb.NOISE if kind == "noisy" else pb.FULL
        body, expert = (pb.VIT, "und") if kind == "vit" else (pb.LATENT, "gen")
        image = vit_images if kind == "vit" else -1
        rows.append((doc, pb.TEXT, sids.start_of_image, split, mode, rope, "und", -1))
        rows += [(doc, body, 0, split, mode, rope, expert, image)] * int(payload)
        rows.append((doc, pb.TEXT, sids.end_of_image, split, mode, rope, "und", -1))
        vit_images += kind == "vit"
        rope += 0 if kind == "noisy" else 1
    und = [i for i, r in enumerate(rows) if r[6] == "und"]
    gen = [i for i, r in enumerate(rows) if r[6] == "gen"]
    vit = [i for i, r in enumerate(rows) if r[1] == pb.VIT]
    budgets = pb.PackBudgets(und_len=len(und) + pad_und, gen_len=len(gen) + pad_gen, vit_len=len(vit),
                             ce_len=len(und), num_vae_images=1, vae_image_size=tuple(vae_image_size),
                             vit_patch_dim=3 * model_cfg.vit.patch_size ** 2)
    pack = pb.empty_pack(budgets)
    slots = list(range(len(und))) + list(range(budgets.und_len, budgets.und_len + len(gen)))
    order = np.full(budgets.seq_len, -1)
    for slot, i in zip(slots, und + gen):
        doc, kind, tid, split, mode, rope_pos, _, _ = rows[i]
        pack["doc_id"][slot], pack["kind"][slot], pack["text_ids"][slot] = doc, kind, tid
        pack["split_id"][slot], pack["split_mode"][slot] = split, mode
        pack["rope_pos"][slot], pack["seq_pos"][slot] = rope_pos, i
        order[slot] = i
    pad = np.flatnonzero(order < 0)
    pack["seq_pos"][pad] = len(rows) + np.arange(len(pad))
    order[pad] = pack["seq_pos"][pad]
    storage_of = {i: s for s, i in zip(slots, und + gen)}
    pack["vit_dest"][:] = [storage_of[i] for i in vit]
    pack["vit_image_id"][:] = [rows[i][7] for i in vit]
    pack["latent_src"][:len(gen)] = np.arange(len(gen))
    pack["ce_index"][:] = np.arange(len(und))
    pack["ce_valid"][:] = True
    pb.check_pack(pack, budgets)
    return pack, budgets, order
