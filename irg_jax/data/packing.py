"""Packing samples into one fixed-budget pack: IRG's ``pack_sequence`` and the model's layout.

:class:`PackBuilder` appends samples in *logical* order exactly as the official
``PackedDataset.pack_sequence`` (spec §4.2) and :meth:`PackBuilder.finish` returns a
:class:`LogicalPack`. :func:`to_packed_batch` turns it into the expert-sorted layout of
``packed_batch.py``; :func:`logical_view` goes back, which is how tests compare with the
official arrays.

Per sample (rope restarts at 0):
  text       ``[bos] ids [eos]``, one causal split, positions rope.., rope += len+2;
             loss -> CE at ``[bos]+ids`` with labels ``ids+[eos]`` (already shifted)
  vit image  ``[soi] patches [eoi]``, one full split, all at rope; rope += 1
  vae image  ``[soi] latents [eoi]``, all at rope; noisy target (loss): split "noise", one
             ``u ~ N(0,1)`` per image, rope unchanged; clean copy: split "full", u = -inf, rope += 1
  CFG dropout (enable_cfg items only; one uniform draw per such item even when p = 0):
             dropped text -> nothing, rope unchanged; dropped image -> nothing, rope += 1

``latent_t`` stores the flow time after the timestep shift, ``t = s*σ(u) / (1 + (s-1)*σ(u))``
(0 for clean images); the raw ``u`` is kept on the LogicalPack for comparisons.

Refinement bridge (ours, off by default: ``refine_bridge_start`` r = 1). With r < 1, a noisy
target that follows a clean VAE image of the same size in its sample (image 2 after the clean
copy of image 1) is trained on the straight path that inference's ``refine_start = r`` follows:
its time is ``r*t`` (t shifted with ``refine_bridge_shift``: the structure comes from the
clean image, so the low-noise end matters more than for a start from noise) and its noise
becomes ``eps + (1-r)/r * (x_src - x0)``, so that at t = r the input is
``r*eps + (1-r)*x_src`` (x_src: the clean image's latent token at the same grid cell). ``latent_bridge_image`` names that clean image (-1: none) and
``latent_bridge_w`` holds ``(1-r)/r`` (0: none).
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from irg_jax.data import packed_batch as pb
from irg_jax.data.irg_format import TEXT, VAE_IMAGE, VIT_IMAGE, Sample
from irg_jax.data.transforms import grid_position_ids, patchify, to_unit_range

MODE_NAMES = {pb.CAUSAL: "causal", pb.FULL: "full", pb.NOISE: "noise"}


class PackRandom(Protocol):
    """Randomness used while packing: ``uniform()`` in [0, 1) for CFG dropout (and group
    choice), ``normal()`` for the per-image timestep logit."""

    def uniform(self) -> float: ...

    def normal(self) -> float: ...


@dataclasses.dataclass
class NumpyPackRandom:
    rng: np.random.Generator

    def uniform(self) -> float:
        return float(self.rng.random())

    def normal(self) -> float:
        return float(self.rng.standard_normal())


@dataclasses.dataclass(frozen=True)
class PackingRules:
    """Token ids and constants of ``pack_sequence``."""

    bos_id: int
    eos_id: int
    start_of_image_id: int
    end_of_image_id: int
    vit_patch_size: int = 14
    vae_stride: int = 16              # autoencoder downsample x latent patch
    max_latent_size: int = 64         # latent position id = row * max_latent_size + col
    vit_max_patches_per_side: int = 70
    text_cond_dropout_prob: float = 0.0
    vit_cond_dropout_prob: float = 0.0
    vae_cond_dropout_prob: float = 0.0
    timestep_shift: float = 1.0
    refine_bridge_start: float = 1.0  # r in (0, 1]; 1: every target starts from noise (IRG)
    refine_bridge_shift: float = 1.0  # timestep shift of bridged targets (before the scaling by r)


def shifted_timestep(u: np.ndarray, shift: float) -> np.ndarray:
    """``σ(u)`` then ``s*t / (1 + (s-1)*t)``; ``u = -inf`` (clean) -> 0. float32."""
    t = 1.0 / (1.0 + np.exp(-np.asarray(u, np.float64)))
    return (shift * t / (1.0 + (shift - 1.0) * t)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Usage:
    """Tokens a sample (with no dropout) or a pack occupies in each budget."""

    und: int = 0      # text + marker + ViT tokens
    gen: int = 0      # VAE latent tokens
    vit: int = 0      # ViT patches
    ce: int = 0       # CE positions
    vae_images: int = 0
    max_h: int = 0    # largest VAE image height / width (for the size bucket)
    max_w: int = 0

    @property
    def tokens(self) -> int:
        return self.und + self.gen

    def __add__(self, o: "Usage") -> "Usage":
        return Usage(self.und + o.und, self.gen + o.gen, self.vit + o.vit, self.ce + o.ce,
                     self.vae_images + o.vae_images, max(self.max_h, o.max_h), max(self.max_w, o.max_w))


def sample_usage(sample: Sample, rules: PackingRules) -> Usage:
    und = gen = vit = ce = nvae = mh = mw = 0
    texts, imgs = iter(sample.text_ids), iter(sample.images)
    for item in sample.plan:
        if item.type == TEXT:
            ids = next(texts)
            und += len(ids) + 2
            ce += (len(ids) + 1) if item.loss else 0
        else:
            img = next(imgs)
            h, w = img.shape[:2]
            und += 2
            if item.type == VIT_IMAGE:
                p = (h // rules.vit_patch_size) * (w // rules.vit_patch_size)
                und, vit = und + p, vit + p
            else:
                gen += (h // rules.vae_stride) * (w // rules.vae_stride)
                nvae, mh, mw = nvae + 1, max(mh, h), max(mw, w)
    return Usage(und, gen, vit, ce, nvae, mh, mw)


@dataclasses.dataclass
class LogicalPack:
    """A pack in logical (official, unsorted) order; ``n`` tokens."""

    kind: np.ndarray          # [n] TEXT / VIT / LATENT
    text_ids: np.ndarray      # [n] id for TEXT tokens (markers included), 0 elsewhere
    doc_id: np.ndarray        # [n] sample index
    split_id: np.ndarray      # [n]
    split_mode: np.ndarray    # [n] CAUSAL / FULL / NOISE
    rope_pos: np.ndarray      # [n]
    vit_patches_u8: np.ndarray  # [P, 3*p*p] uint8
    vit_pos_ids: np.ndarray   # [P]
    vit_image_id: np.ndarray  # [P]
    vit_seqlens: np.ndarray   # [nI]
    vae_images: list          # nV uint8 [H, W, 3], pack order (noisy and clean copies separate)
    latent_image: np.ndarray  # [V] index into vae_images
    latent_row: np.ndarray    # [V]
    latent_col: np.ndarray    # [V]
    latent_pos_ids: np.ndarray  # [V]
    latent_u: np.ndarray      # [V] float32 raw logit; -inf for clean images
    latent_t: np.ndarray      # [V] float32 shifted flow time (times r when bridged); 0 for clean images
    latent_bridge_image: np.ndarray  # [V] clean VAE image a bridged target starts from; -1: none
    latent_bridge_w: np.ndarray      # [V] float32 (1-r)/r for bridged targets, else 0
    ce_pos: np.ndarray        # [C] logical positions that predict a label
    ce_labels: np.ndarray     # [C]
    ce_weights: np.ndarray    # [C] float32 1/sqrt(len(ids)+1) (IRG's optional reweighting)
    sample_lens: list
    split_lens: list
    attn_modes: list          # "causal" / "full" / "noise" per split
    sources: list             # row of each sample, for messages
    vae_stride: int = 16      # pixels per latent token side

    @property
    def num_tokens(self) -> int:
        return int(self.kind.shape[0])

    @property
    def latent_noisy(self) -> np.ndarray:
        return np.isfinite(self.latent_u)

    def usage(self) -> Usage:
        shapes = [im.shape for im in self.vae_images]
        return Usage(int(np.sum(self.kind != pb.LATENT)), int(np.sum(self.kind == pb.LATENT)),
                     int(self.vit_pos_ids.shape[0]), int(self.ce_pos.shape[0]), len(self.vae_images),
                     max((s[0] for s in shapes), default=0), max((s[1] for s in shapes), default=0))


class PackBuilder:
    """Appends samples to one pack as IRG's ``pack_sequence`` does."""

    def __init__(self, rules: PackingRules):
        self.rules = rules
        self.n = 0                  # tokens in the pack (official ``curr``)
        self.usage = Usage()        # budget use, counted before dropout
        self.num_samples = 0
        self._tok = {k: [] for k in ("kind", "text_ids", "doc_id", "split_id", "split_mode", "rope_pos")}
        self._vit = {k: [] for k in ("patches", "pos", "image")}
        self._lat = {k: [] for k in ("image", "row", "col", "pos", "u", "bridge", "scale")}
        self._ce = {k: [] for k in ("pos", "labels", "weights")}
        self.vit_seqlens: list[int] = []
        self.vae_images: list[np.ndarray] = []
        self.sample_lens: list[int] = []
        self.split_lens: list[int] = []
        self.attn_modes: list[str] = []
        self.sources: list[str] = []

    def _emit_split(self, kind: np.ndarray, text_ids: np.ndarray, mode: int, rope: np.ndarray) -> int:
        n = kind.shape[0]
        t = self._tok
        t["kind"].append(kind)
        t["text_ids"].append(text_ids)
        t["doc_id"].append(np.full(n, self.num_samples, np.int32))
        t["split_id"].append(np.full(n, len(self.split_lens), np.int32))
        t["split_mode"].append(np.full(n, mode, np.int32))
        t["rope_pos"].append(np.broadcast_to(np.asarray(rope, np.int32), (n,)).copy())
        start = self.n
        self.n += n
        self.split_lens.append(n)
        self.attn_modes.append(MODE_NAMES[mode])
        return start

    def add(self, sample: Sample, rand: PackRandom, usage: Usage | None = None) -> None:
        r = self.rules
        start, rope = self.n, 0
        last_clean = None  # (index in vae_images, shape) of the sample's latest clean VAE image
        texts, imgs = iter(sample.text_ids), iter(sample.images)
        for item in sample.plan:
            if item.type == TEXT:
                ids = np.asarray(next(texts), np.int32)
                if item.enable_cfg and rand.uniform() < r.text_cond_dropout_prob:
                    continue
                length = ids.shape[0] + 2
                tokens = np.concatenate([[r.bos_id], ids, [r.eos_id]]).astype(np.int32)
                first = self._emit_split(np.full(length, pb.TEXT, np.int32), tokens, pb.CAUSAL,
                                         np.arange(rope, rope + length))
                if item.loss:
                    self._ce["pos"].append(np.arange(first, first + length - 1, dtype=np.int32))
                    self._ce["labels"].append(tokens[1:])
                    self._ce["weights"].append(np.full(length - 1, 1.0 / np.sqrt(length - 1), np.float32))
                rope += length
            elif item.type == VIT_IMAGE:
                img = next(imgs)
                if item.enable_cfg and rand.uniform() < r.vit_cond_dropout_prob:
                    rope += 1
                    continue
                patches = patchify(img, r.vit_patch_size)
                p = patches.shape[0]
                kind = np.full(p + 2, pb.VIT, np.int32)
                kind[[0, -1]] = pb.TEXT
                ids = np.zeros(p + 2, np.int32)
                ids[0], ids[-1] = r.start_of_image_id, r.end_of_image_id
                self._emit_split(kind, ids, pb.FULL, rope)
                self._vit["patches"].append(patches)
                self._vit["pos"].append(grid_position_ids(img.shape[0], img.shape[1], r.vit_patch_size,
                                                          r.vit_max_patches_per_side))
                self._vit["image"].append(np.full(p, len(self.vit_seqlens), np.int32))
                self.vit_seqlens.append(p)
                rope += 1
            elif item.type == VAE_IMAGE:
                img = next(imgs)
                if item.enable_cfg and rand.uniform() < r.vae_cond_dropout_prob:
                    rope += 1
                    continue
                h, w = img.shape[0] // r.vae_stride, img.shape[1] // r.vae_stride
                kind = np.full(h * w + 2, pb.LATENT, np.int32)
                kind[[0, -1]] = pb.TEXT
                ids = np.zeros(h * w + 2, np.int32)
                ids[0], ids[-1] = r.start_of_image_id, r.end_of_image_id
                self._emit_split(kind, ids, pb.NOISE if item.loss else pb.FULL, rope)
                rows, cols = np.divmod(np.arange(h * w, dtype=np.int32), np.int32(w))
                self._lat["image"].append(np.full(h * w, len(self.vae_images), np.int32))
                self._lat["row"].append(rows)
                self._lat["col"].append(cols)
                self._lat["pos"].append(grid_position_ids(img.shape[0], img.shape[1], r.vae_stride,
                                                          r.max_latent_size))
                u = np.float32(rand.normal()) if item.loss else np.float32(-np.inf)
                self._lat["u"].append(np.full(h * w, u, np.float32))
                r_start = r.refine_bridge_start
                bridged = item.loss and r_start < 1.0 and last_clean is not None and last_clean[1] == img.shape
                self._lat["bridge"].append(np.full(h * w, last_clean[0] if bridged else -1, np.int32))
                self._lat["scale"].append(np.full(h * w, r_start if bridged else 1.0, np.float32))
                self.vae_images.append(img)
                if not item.loss:
                    last_clean = (len(self.vae_images) - 1, img.shape)
                    rope += 1
            else:
                raise ValueError(f"{sample.source}: unknown plan item type {item.type!r}")
        self.sample_lens.append(self.n - start)
        self.sources.append(sample.source)
        self.num_samples += 1
        self.usage = self.usage + (usage or sample_usage(sample, r))

    def finish(self) -> LogicalPack:
        def cat(chunks, dtype, width=None):
            if chunks:
                return np.concatenate(chunks).astype(dtype, copy=False)
            return np.zeros((0,) if width is None else (0, width), dtype)

        t, v, l, c = self._tok, self._vit, self._lat, self._ce
        u = cat(l["u"], np.float32)
        scale = cat(l["scale"], np.float32)
        bridged = scale < 1.0
        lat_t = np.where(bridged, shifted_timestep(u, self.rules.refine_bridge_shift) * scale,
                     shifted_timestep(u, self.rules.timestep_shift)).astype(np.float32)
        p = self.rules.vit_patch_size
        return LogicalPack(
            kind=cat(t["kind"], np.int32), text_ids=cat(t["text_ids"], np.int32),
            doc_id=cat(t["doc_id"], np.int32), split_id=cat(t["split_id"], np.int32),
            split_mode=cat(t["split_mode"], np.int32), rope_pos=cat(t["rope_pos"], np.int32),
            vit_patches_u8=cat(v["patches"], np.uint8, 3 * p * p), vit_pos_ids=cat(v["pos"], np.int32),
            vit_image_id=cat(v["image"], np.int32), vit_seqlens=np.asarray(self.vit_seqlens, np.int32),
            vae_images=list(self.vae_images), latent_image=cat(l["image"], np.int32),
            latent_row=cat(l["row"], np.int32), latent_col=cat(l["col"], np.int32),
            latent_pos_ids=cat(l["pos"], np.int32), latent_u=u,
            latent_t=lat_t,
            latent_bridge_image=cat(l["bridge"], np.int32),
            latent_bridge_w=((1.0 - scale) / scale).astype(np.float32),
            ce_pos=cat(c["pos"], np.int32), ce_labels=cat(c["labels"], np.int32),
            ce_weights=cat(c["weights"], np.float32), sample_lens=list(self.sample_lens),
            split_lens=list(self.split_lens), attn_modes=list(self.attn_modes), sources=list(self.sources),
            vae_stride=self.rules.vae_stride)


def fits(usage: Usage, budgets: pb.PackBudgets, max_image_hw: tuple[int, int]) -> str | None:
    """None if ``usage`` fits the static budgets, else the name of the first budget it exceeds."""
    limits = (("und_len", usage.und, budgets.und_len), ("gen_len", usage.gen, budgets.gen_len),
              ("vit_len", usage.vit, budgets.vit_len), ("ce_len", usage.ce, budgets.ce_len),
              ("num_vae_images", usage.vae_images, budgets.num_vae_images),
              ("vae_image_size", usage.max_h, max_image_hw[0]), ("vae_image_size", usage.max_w, max_image_hw[1]))
    for name, used, limit in limits:
        if used > limit:
            return name
    return None


def to_packed_batch(lp: LogicalPack, budgets: pb.PackBudgets) -> dict[str, np.ndarray]:
    """Expert-sorted arrays of ``packed_batch.array_specs(budgets)`` (see that module)."""
    out = pb.empty_pack(budgets)
    n = lp.num_tokens
    und = np.flatnonzero(lp.kind != pb.LATENT)
    gen = np.flatnonzero(lp.kind == pb.LATENT)
    used = lp.usage()
    bad = fits(used, budgets, budgets.vae_image_size)
    if bad:
        raise ValueError(f"pack does not fit budget {bad}: uses {used}, budgets {budgets}")
    storage = np.empty(n, np.int64)
    storage[und] = np.arange(und.shape[0])
    storage[gen] = budgets.und_len + np.arange(gen.shape[0])
    for name in ("text_ids", "kind", "doc_id", "split_id", "split_mode", "rope_pos"):
        out[name][storage] = getattr(lp, name)
    out["seq_pos"][storage] = np.arange(n)
    pad = np.setdiff1d(np.arange(budgets.seq_len), storage, assume_unique=True)
    out["seq_pos"][pad] = n + np.arange(pad.shape[0])

    p = lp.vit_pos_ids.shape[0]
    out["vit_patches"][:p] = to_unit_range(lp.vit_patches_u8)
    out["vit_pos_ids"][:p] = lp.vit_pos_ids
    out["vit_image_id"][:p] = lp.vit_image_id
    out["vit_dest"][:p] = storage[lp.kind == pb.VIT]

    hb, wb = budgets.vae_image_size
    for i, img in enumerate(lp.vae_images):
        out["vae_images"][i, :img.shape[0], :img.shape[1]] = to_unit_range(img)
    v = lp.latent_u.shape[0]
    hmax, wmax = hb // lp.vae_stride, wb // lp.vae_stride
    out["latent_src"][:v] = lp.latent_image * (hmax * wmax) + lp.latent_row * wmax + lp.latent_col
    bridged = lp.latent_bridge_image >= 0
    out["latent_bridge_src"][:v] = np.where(
        bridged, lp.latent_bridge_image * (hmax * wmax) + lp.latent_row * wmax + lp.latent_col, 0)
    out["latent_bridge_w"][:v] = lp.latent_bridge_w
    out["latent_pos_ids"][:v] = lp.latent_pos_ids
    out["latent_t"][:v] = lp.latent_t
    out["latent_noisy"][:v] = lp.latent_noisy

    c = lp.ce_pos.shape[0]
    out["ce_index"][:c] = storage[lp.ce_pos]
    out["ce_labels"][:c] = lp.ce_labels
    out["ce_valid"][:c] = True
    return out


def rebucket(pack: dict[str, np.ndarray], new_hw: tuple[int, int], vae_stride: int) -> dict[str, np.ndarray]:
    """Re-pad a pack's VAE images into a larger ``(H, W)`` bucket (``latent_src`` is re-indexed).
    Works on one pack or on a batch (leading axis)."""
    imgs = pack["vae_images"]
    h, w = imgs.shape[-3:-1]
    nh, nw = new_hw
    if (nh, nw) == (h, w):
        return pack
    if nh < h or nw < w:
        raise ValueError(f"cannot shrink bucket {h}x{w} to {nh}x{nw}")
    out = dict(pack)
    padded = np.zeros(imgs.shape[:-3] + (nh, nw, 3), np.float32)
    padded[..., :h, :w, :] = imgs
    out["vae_images"] = padded
    hm, wm, nhm, nwm = h // vae_stride, w // vae_stride, nh // vae_stride, nw // vae_stride
    for key in ("latent_src", "latent_bridge_src"):
        img, rem = np.divmod(pack[key], hm * wm)
        row, col = np.divmod(rem, wm)
        out[key] = (img * (nhm * nwm) + row * nwm + col).astype(np.int32)
    return out


def logical_view(pack: dict[str, np.ndarray], budgets: pb.PackBudgets, vae_stride: int = 16) -> dict:
    """Undo the expert sort of one pack: the official (logical-order) arrays.

    Keys follow the official ``to_tensor`` names where they exist (``packed_text_ids``,
    ``packed_text_indexes``, ``packed_position_ids``, ``packed_vae_token_indexes``,
    ``packed_latent_position_ids``, ``mse_loss_indexes``, ``packed_vit_token_indexes``,
    ``packed_vit_position_ids``, ``vit_token_seqlens``, ``packed_vit_tokens``,
    ``ce_loss_indexes``, ``packed_label_ids``, ``sample_lens``, ``split_lens``, ``attn_modes``,
    ``patchified_vae_latent_shapes``) plus ``latent_t``, ``vae_image_crops`` (each VAE image
    cut back to its latent grid) and per-token ``doc_id``/``split_id``/``split_mode``."""
    real = pack["kind"] != pb.PAD
    n = int(real.sum())
    order = np.full(n, -1, np.int64)  # logical position -> storage index
    order[pack["seq_pos"][real]] = np.flatnonzero(real)
    if (order < 0).any():
        raise ValueError("seq_pos of real tokens is not a permutation of 0..n-1")
    kind = pack["kind"][order]
    logical_of = np.full(budgets.seq_len, -1, np.int64)
    logical_of[order] = np.arange(n)
    is_text, is_vit, is_lat = kind == pb.TEXT, kind == pb.VIT, kind == pb.LATENT
    gen_rows = order[is_lat] - budgets.und_len           # latent rows in logical order
    noisy = pack["latent_noisy"][gen_rows]
    p = int(is_vit.sum())
    vit_rows = np.argsort(logical_of[pack["vit_dest"][:p]], kind="stable")
    vit_img = pack["vit_image_id"][:p][vit_rows]
    doc, split, mode = pack["doc_id"][order], pack["split_id"][order], pack["split_mode"][order]
    bounds = np.flatnonzero(np.diff(split)) + 1
    split_starts = np.concatenate([[0], bounds]) if n else np.zeros(0, np.int64)
    split_lens = np.diff(np.concatenate([split_starts, [n]])) if n else np.zeros(0, np.int64)
    ce = int(pack["ce_valid"].sum())
    src = pack["latent_src"][gen_rows]
    hb, wb = budgets.vae_image_size
    hm, wm = hb // vae_stride, wb // vae_stride
    img_of, rem = np.divmod(src, hm * wm)
    row, col = np.divmod(rem, wm)
    crops, shapes = [], []
    for i in np.unique(img_of):
        sel = img_of == i
        h, w = int(row[sel].max()) + 1, int(col[sel].max()) + 1
        shapes.append((h, w))
        crops.append(pack["vae_images"][i, :h * vae_stride, :w * vae_stride])
    return {
        "packed_text_ids": pack["text_ids"][order][is_text],
        "packed_text_indexes": np.flatnonzero(is_text),
        "packed_position_ids": pack["rope_pos"][order],
        "packed_vae_token_indexes": np.flatnonzero(is_lat),
        "packed_latent_position_ids": pack["latent_pos_ids"][gen_rows],
        "mse_loss_indexes": np.flatnonzero(is_lat)[noisy],
        "latent_t": pack["latent_t"][gen_rows],
        "packed_vit_token_indexes": np.flatnonzero(is_vit),
        "packed_vit_position_ids": pack["vit_pos_ids"][:p][vit_rows],
        "packed_vit_tokens": pack["vit_patches"][:p][vit_rows],
        "vit_token_seqlens": np.bincount(vit_img)[np.unique(vit_img)] if p else np.zeros(0, np.int64),
        "ce_loss_indexes": logical_of[pack["ce_index"][:ce]],
        "packed_label_ids": pack["ce_labels"][:ce],
        "sample_lens": np.bincount(doc)[np.unique(doc)] if n else np.zeros(0, np.int64),
        "split_lens": split_lens,
        "attn_modes": [MODE_NAMES[int(m)] for m in mode[split_starts]] if n else [],
        "patchified_vae_latent_shapes": np.asarray(shapes, np.int64).reshape(-1, 2),
        "vae_image_crops": crops,
        "doc_id": doc, "split_id": split, "split_mode": mode,
    }
