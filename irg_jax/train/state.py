"""The train state: one pytree that is sharded, donated, checkpointed and restored as a unit."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimiser updates applied so far
    params: Any              # pure dict of float32 arrays (trainable and frozen)
    ema: Any                 # EMA of params (same structure and sharding), or {} when disabled
    opt_state: Any           # optax state; statically frozen leaves hold none
    rng: jax.Array           # uint32[2] raw key data (checkpointable)
    nonfinite_streak: jax.Array  # int32: consecutive skipped (non-finite) updates
    nonfinite_total: jax.Array   # int32: all skipped updates in this run


def create(params: Any, tx, rng: jax.Array, use_ema: bool) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema=jax.tree.map(jnp.copy, params) if use_ema else {},
        opt_state=tx.init(params),
        rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng,
        nonfinite_streak=jnp.zeros((), jnp.int32),
        nonfinite_total=jnp.zeros((), jnp.int32),
    )


def shardings(abstract_state: TrainState, param_shardings: Any, replicated: jax.sharding.Sharding,
              tx: optax.GradientTransformation) -> TrainState:
    """Shardings for a TrainState: params, EMA and Adam moments follow the parameter shardings.

    ``optax.tree_map_params`` finds the copies of the parameter tree inside ``tx``'s state
    (the Adam moments) and gives them the parameter shardings; everything else (step
    counters, empty states) is replicated. A statically frozen leaf holds no state: its place
    in the moments is an ``optax.MaskedNode`` (``optax.multi_transform`` masks it out), which
    is kept as it is (an empty node, so no sharding).
    """
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    opt_state = optax.tree_map_params(
        tx, lambda leaf, sharding: leaf if masked(leaf) else sharding, abstract_state.opt_state, param_shardings,
        transform_non_params=lambda _: replicated, is_leaf=masked)
    return TrainState(
        step=replicated, params=param_shardings,
        ema=param_shardings if abstract_state.ema else {},
        opt_state=opt_state,
        rng=replicated, nonfinite_streak=replicated, nonfinite_total=replicated)
