"""Optimiser, learning-rate schedule and parameter freezing.

Two kinds of freezing, both with real per-parameter masks:
- static (``config.freeze.llm`` …): frozen leaves get ``optax.set_to_zero`` and hold **no**
  optimiser state;
- step-triggered (IRG's ``freeze_*_step``): from that step on, the leaf's update is
  multiplied by zero inside the jitted step (its optimiser state is kept, since the
  state layout cannot change mid-run).

Parameter groups are matched on the '/'-joined parameter path (see :data:`GROUPS`).
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Parameter groups by path regex. Paths look like "decoder/layers/0/attn/gen/q_proj/kernel".
GROUPS: dict[str, str] = {
    "llm": r"^decoder/",
    "vit": r"^vit/",
    # MoT experts: per-layer copies live under .../und/... and .../gen/...
    "und_expert": r"^decoder/.*(^|/)und(/|$)",
    "gen_expert": r"^decoder/.*(^|/)gen(/|$)",
    # The image side outside the decoder: latent in/out projections and the time embedder.
    "image_io": r"^(vae2llm|llm2vae|time_embedder)/",
}


def path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def group_mask(params: Any, group: str) -> Any:
    """A pytree of bools: True where the parameter belongs to ``group``."""
    pattern = re.compile(GROUPS[group])
    return jax.tree_util.tree_map_with_path(lambda p, _: bool(pattern.search(path_str(p))), params)


def _or(*masks):
    return jax.tree.map(lambda *b: any(b), *masks)


def static_frozen_mask(params: Any, freeze: ml_collections.ConfigDict) -> Any:
    """True for parameters frozen for the whole run."""
    parts = [jax.tree.map(lambda _: False, params)]
    if freeze.llm:
        parts.append(group_mask(params, "llm"))
    if freeze.vit:
        parts.append(group_mask(params, "vit"))
    if freeze.und_expert:
        parts.append(group_mask(params, "und_expert"))
    if freeze.gen_expert:
        parts.append(_or(group_mask(params, "gen_expert"), group_mask(params, "image_io")))
    return _or(*parts)


def step_frozen_fn(params: Any, freeze: ml_collections.ConfigDict) -> Callable[[jax.Array], Any]:
    """Returns ``step -> pytree of bool`` for IRG's step-triggered freezing."""
    triggers = []
    if freeze.llm_step >= 0:
        triggers.append((freeze.llm_step, group_mask(params, "llm")))
    if freeze.text_experts_step >= 0:
        triggers.append((freeze.text_experts_step, group_mask(params, "und_expert")))
    if freeze.vit_step >= 0:
        triggers.append((freeze.vit_step, group_mask(params, "vit")))
    if freeze.image_experts_step >= 0:
        triggers.append((freeze.image_experts_step,
                         _or(group_mask(params, "gen_expert"), group_mask(params, "image_io"))))

    def frozen_at(step):
        out = jax.tree.map(lambda _: jnp.zeros((), bool), params)
        for at, mask in triggers:
            out = jax.tree.map(lambda o, m: o | (m & (step >= at)), out, mask)
        return out

    return frozen_at


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    warmup = optim.warmup_steps
    if optim.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(optim.lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, optim.lr, warmup), optax.constant_schedule(optim.lr)], [warmup])
    decay_steps = max(total_steps - warmup, 1)
    return optax.warmup_cosine_decay_schedule(0.0, optim.lr, max(warmup, 0), warmup + decay_steps, optim.min_lr)


def make_optimizer(config: ml_collections.ConfigDict, params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping; statically frozen leaves hold no state."""
    schedule = learning_rate_schedule(config.optim, config.total_steps)
    adamw = optax.chain(
        optax.clip_by_global_norm(config.optim.clip_norm) if config.optim.clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps,
                    weight_decay=config.optim.weight_decay),
    )
    frozen = static_frozen_mask(params, config.freeze)
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels), schedule
