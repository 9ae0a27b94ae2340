"""Build a module directly from converted checkpoint arrays, with strict key and shape checks.

The module is created abstractly (``nnx.eval_shape``, no random init) and every
parameter is filled from ``values``: a mapping from the parameter's path
(``"encoder/down/0/block/0/conv1/kernel"``) to ``(source_key, array)``. Missing
parameters, extra values and shape mismatches raise one ValueError naming them all.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx


def param_path(path: tuple) -> str:
    """'/'-joined parameter path, as used for the keys of ``values``."""
    return "/".join(str(p) for p in path)


def param_paths(create: Callable[[], nnx.Module]) -> dict[str, tuple[int, ...]]:
    """Every parameter path of the module ``create()`` builds, with its shape (no allocation)."""
    _, state = nnx.split(nnx.eval_shape(create))
    return {param_path(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(state)}


def build_from_arrays(create: Callable[[], nnx.Module], values: Mapping[str, tuple[str, np.ndarray]],
                      origin: str) -> nnx.Module:
    """``create()``'s module with every parameter taken from ``values`` (float32).

    ``origin`` names the checkpoint file in error messages.
    """
    graphdef, state = nnx.split(nnx.eval_shape(create))
    flat = nnx.to_flat_state(state)
    targets = {param_path(p) for p, _ in flat}
    missing = sorted(targets - set(values))
    extra = sorted(f"{values[k][0]} -> {k}" for k in set(values) - targets)
    bad_shape = []
    for p, var in flat:
        name = param_path(p)
        if name in values:
            key, arr = values[name]
            want = tuple(var.get_value().shape)
            if tuple(np.shape(arr)) != want:
                bad_shape.append(f"{key} -> {name}: got {tuple(np.shape(arr))}, want {want}")
    if missing or extra or bad_shape:
        raise ValueError(f"{origin}: cannot fill the module.\n  parameters with no source key: {missing}\n"
                         f"  source keys with no parameter: {extra}\n  shape mismatches: {bad_shape}")
    filled = [(p, var.replace(jnp.asarray(values[param_path(p)][1], jnp.float32))) for p, var in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def check_all_used(tensors: Mapping[str, np.ndarray], used: set[str], prefixes: tuple[str, ...],
                   origin: str) -> None:
    """Raise ValueError listing the keys under ``prefixes`` that no parameter consumed."""
    unused = sorted(k for k in tensors if k.startswith(prefixes) and k not in used)
    if unused:
        raise ValueError(f"{origin}: source keys not used by any parameter: {unused}")
