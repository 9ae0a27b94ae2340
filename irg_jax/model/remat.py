"""Rematerialisation (activation checkpointing) policies, chosen by name in the config.

With ``model.remat`` on, every decoder layer and ViT block is rematerialised, and
``model.remat_policy`` names what it keeps for its backward pass:

* ``nothing_saveable``: only the layer inputs are saved; the backward recomputes the layer
  (least memory; the default of the large configs);
* ``dots_saveable``: also keep the outputs of matmuls without batch dimensions (the
  projections and the MLP), recompute the rest (norms, activations, attention);
* ``offload_dots``: like ``dots_saveable`` but the saved matmul outputs go to host memory
  (``pinned_host``); only for backends with host memory spaces (GPU, TPU).
"""
from __future__ import annotations

from typing import Callable

import jax

POLICIES = ("nothing_saveable", "dots_saveable", "offload_dots")


def policy(name: str):
    """The ``jax.checkpoint`` policy for ``name``."""
    if name == "nothing_saveable":
        return jax.checkpoint_policies.nothing_saveable
    if name == "dots_saveable":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "offload_dots":
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ValueError(f"model.remat_policy={name!r}: unknown; choose one of {POLICIES}")


def checkpoint(fn: Callable, name: str | None, static_argnums: tuple[int, ...] = ()) -> Callable:
    """``fn`` rematerialised under policy ``name``; unchanged for ``none`` or None."""
    if name in (None, "none"):
        return fn
    return jax.checkpoint(fn, static_argnums=static_argnums, policy=policy(name))


def policy_name(model_cfg) -> str:
    """The policy a model config asks for: ``none`` without ``remat``, else ``remat_policy``."""
    if not model_cfg.get("remat", False):
        return "none"
    return model_cfg.get("remat_policy", "") or "nothing_saveable"
