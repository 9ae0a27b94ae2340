"""FLOPs utilisation: achieved FLOP/s over the devices' peak, with the attention counted honestly.

Two figures, as MaxText separates them:

* **model FLOPs** count the attention the mask allows: 4·heads·head_dim FLOPs per allowed
  (query, key) pair and layer in the forward (QKᵀ and PV), no matter how it is computed;
* **hardware FLOPs** count what the blockwise attention computes: every (query, key) pair of
  each tile that holds at least one allowed pair (the padding of a pack is its own causal
  document, so its tiles count too); ``dense`` computes all L² pairs.

Everything else (projections, MLP, lm head, ViT, latent in/out) is the same in both and comes
from :func:`irg_jax.model.bagel.forward_flops`. Training = 3× the forward.

Peaks are dense bf16 figures from vendor data sheets, per device. On CPU there is no
data-sheet figure that means anything, so the peak is *measured* at start-up: a large
fp32 matmul under jit (about 200 GFLOP/s on an idle 2-core dev machine). A device kind not
in the table is no reason to stop training: :func:`peak_flops_per_device` returns NaN and the
loop logs "MFU unavailable".
"""
from __future__ import annotations

import functools
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from irg_jax.model.attention import TokenMeta, mask_rule
from irg_jax.parallel import sharding

# Substring of jax.Device.device_kind (lower case) -> peak FLOP/s per device.
PEAK_FLOPS = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("l4", 121e12),
    ("v6 lite", 918e12),
    ("v6e", 918e12),
    ("v5p", 459e12),
    ("v5 lite", 197e12),
    ("v5e", 197e12),
    ("v4", 275e12),
)
META_FIELDS = ("doc_id", "split_id", "split_mode", "seq_pos")
# The attention pairs of each step, summed in the step's metrics window: (allowed, computed).
PAIR_SUMS = ("attention_allowed_pairs", "attention_computed_pairs")


def measure_matmul_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """FLOP/s of an n×n fp32 matmul on the default device (median of ``repeats``)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / float(np.median(times))


def peak_flops_per_device(device: jax.Device | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where the figure came from) for one device; NaN for an unknown kind."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    for key, peak in PEAK_FLOPS:
        if key in kind:
            return peak, f"data sheet ({device.device_kind})"
    if device.platform == "cpu":
        return measure_matmul_flops(), "measured fp32 matmul"
    logging.warning("MFU unavailable: no peak FLOP/s known for device kind %r (add it to "
                    "irg_jax.train.mfu.PEAK_FLOPS); training goes on", device.device_kind)
    return float("nan"), f"MFU unavailable (unknown device kind {device.device_kind!r})"


def mfu(flops_per_step: float, step_seconds: float, peak_per_device: float, num_devices: int) -> float:
    """Fraction of the aggregate peak achieved (NaN when the peak is unknown)."""
    if not math.isfinite(peak_per_device):
        return float("nan")
    return flops_per_step / max(step_seconds, 1e-12) / (peak_per_device * num_devices)


# ------------------------------------------------------------------ attention work of a batch

@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "impl"))
def attention_pairs(doc_id, split_id, split_mode, seq_pos, *, block_q: int, block_k: int,
                    impl: str = "pallas") -> jax.Array:
    """float32 [2]: (allowed (q, k) pairs, computed (q, k) pairs) summed over a batch [B, L].

    Computed pairs: ``block_q·block_k`` per tile with at least one allowed pair. The Pallas
    kernels walk each pack's own tile list (``impl`` "pallas"); ``chunked`` walks each pack's own
    list too, but the packs on one device step together, so for each query block every pack
    computes as many tiles as that device's pack with the most; ``dense`` computes ``L²`` per pack.
    One query block at a time, so the memory is ``B·block_q·L`` booleans. On a mesh the packs
    are counted on their own devices (``shard_map``, as the attention runs): no collective
    inside the loop, one sum after it."""
    meta = TokenMeta(*(jnp.asarray(a, jnp.int32) for a in (doc_id, split_id, split_mode, seq_pos)))
    names = TokenMeta(*[("batch", None)] * 4)
    per_pack = sharding.per_device(functools.partial(_pack_pairs, block_q=block_q, block_k=block_k, impl=impl),
                                   (meta,), (names,), ("batch", None))
    return per_pack.sum(0)


def _pack_pairs(meta: TokenMeta, *, block_q: int, block_k: int, impl: str) -> jax.Array:
    """float32 [B, 2]: :func:`attention_pairs` of each pack of ``meta`` (the packs of one device)."""
    b, length = meta.doc_id.shape
    bq, bk = min(block_q, length), min(block_k, length)
    nq, nk = -(-length // bq), -(-length // bk)
    from irg_jax.model.kernels.block_lists import pad_meta
    qp = pad_meta(meta, nq * bq, query=True)
    kp = pad_meta(meta, nk * bk, query=False)
    q_blocks = TokenMeta(*(jnp.moveaxis(a.reshape(b, nq, bq), 1, 0) for a in qp))
    k_fields = tuple(a[:, None, :] for a in kp)

    def one(qm: TokenMeta):
        tile = mask_rule(*(a[:, :, None] for a in qm), *k_fields)  # [B, bq, nk*bk]
        allowed = tile.sum(axis=(1, 2), dtype=jnp.float32)
        tiles = tile.reshape(b, bq, nk, bk).any(axis=(1, 3)).sum(axis=1, dtype=jnp.float32)  # [B]
        if impl == "chunked":  # the packs step together, as many steps as the pack with the most tiles
            tiles = jnp.broadcast_to(tiles.max(), tiles.shape)
        return jnp.stack([allowed, tiles * bq * bk], axis=1)

    out = jax.lax.map(one, q_blocks).sum(0)
    if impl == "dense":
        out = out.at[:, 1].set(float(length * length))
    return out


def batch_attention_pairs(batch, attn_cfg) -> jax.Array:
    """:func:`attention_pairs` of a packed batch with the model's ``model.attention`` settings."""
    impl = resolve_impl(attn_cfg.impl)
    return attention_pairs(*(batch[f] for f in META_FIELDS), block_q=int(attn_cfg.block_q),
                           block_k=int(attn_cfg.block_k), impl=impl if impl in ("chunked", "dense") else "pallas")


def batch_pair_sums(batch, attn_cfg) -> dict:
    """{name: count} for :data:`PAIR_SUMS`: the train step adds these into its metrics window
    (``irg_jax.train.setup``), so the loop gets the window's pairs with the window itself."""
    pairs = batch_attention_pairs(batch, attn_cfg)
    return {name: pairs[i] for i, name in enumerate(PAIR_SUMS)}


def window_pairs(sums: dict, steps: int) -> np.ndarray:
    """float32 [2]: mean (allowed, computed) pairs per step of a fetched window's ``sums``."""
    return np.stack([np.asarray(sums[name], np.float32) for name in PAIR_SUMS]) / steps


def attention_flops_per_pair(model_cfg) -> float:
    """Training FLOPs per (query, key) pair summed over the decoder layers (3× the forward)."""
    llm = model_cfg.llm
    return 3.0 * llm.num_layers * 4 * llm.num_heads * llm.head_dim


def non_attention_flops(model_cfg, batch_size: int, budgets) -> float:
    """Training FLOPs of one step without the decoder's attention scores and values."""
    from irg_jax.model.bagel import forward_flops
    f = forward_flops(model_cfg, batch=batch_size, und_len=budgets.und_len, gen_len=budgets.gen_len,
                      vit_len=budgets.vit_len, ce_len=budgets.ce_len)
    return 3.0 * (f["total"] - f["llm_attention"])


def split_flops(model_cfg, batch_size: int, budgets, allowed_pairs: float, computed_pairs: float) -> dict:
    """{'model', 'hardware', 'attention_allowed_share', 'attention_computed_share'} for one step
    whose batch holds ``allowed_pairs`` / ``computed_pairs`` (see :func:`attention_pairs`)."""
    rest = non_attention_flops(model_cfg, batch_size, budgets)
    per_pair = attention_flops_per_pair(model_cfg)
    full = float(batch_size) * (budgets.und_len + budgets.gen_len) ** 2
    return {"model": rest + per_pair * allowed_pairs, "hardware": rest + per_pair * computed_pairs,
            "attention_allowed_share": allowed_pairs / full, "attention_computed_share": computed_pairs / full}


def resolve_impl(name: str) -> str:
    """The attention impl ``name`` runs as on this backend (``auto`` resolved)."""
    from irg_jax.model.attention import resolve
    return resolve(name)


def mfu_scalars(model_cfg, batch_size: int, budgets, pairs, step_seconds: float, peak_per_device: float,
                num_devices: int) -> dict:
    """The loop's logged figures for one step with attention ``pairs`` = (allowed, computed):
    ``mfu`` (model FLOPs), ``mfu_hardware`` (hardware FLOPs), and the attention shares."""
    f = split_flops(model_cfg, batch_size, budgets, float(pairs[0]), float(pairs[1]))
    return {"mfu": mfu(f["model"], step_seconds, peak_per_device, num_devices),
            "mfu_hardware": mfu(f["hardware"], step_seconds, peak_per_device, num_devices),
            "attention_allowed_share": f["attention_allowed_share"],
            "attention_computed_share": f["attention_computed_share"]}
