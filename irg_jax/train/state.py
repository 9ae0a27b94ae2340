"""The train state: one pytree that is sharded, donated, checkpointed and restored as a unit."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


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


def shardings(abstract_state: TrainState, param_shardings: Any, replicated: jax.sharding.Sharding) -> TrainState:
    """Shardings for a TrainState: params, EMA and Adam moments follow the parameter shardings.

    optax nests the parameter tree inside its states, so an optimiser-state leaf takes the
    sharding of the parameter whose path is a suffix of its own path and whose shape it
    has; everything else (step counters, empty states) is replicated.
    """
    params_flat = jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
    shard_flat = jax.tree.leaves(param_shardings)
    by_path = {tuple(map(str, p)): (leaf.shape, s) for (p, leaf), s in zip(params_flat, shard_flat)}

    def opt_leaf(path, leaf):
        keys = tuple(map(str, path))
        for n in range(len(keys)):
            hit = by_path.get(keys[n:])
            if hit is not None and hit[0] == getattr(leaf, "shape", None):
                return hit[1]
        return replicated

    return TrainState(
        step=replicated, params=param_shardings,
        ema=param_shardings if abstract_state.ema else {},
        opt_state=jax.tree_util.tree_map_with_path(opt_leaf, abstract_state.opt_state),
        rng=replicated, nonfinite_streak=replicated, nonfinite_total=replicated)
