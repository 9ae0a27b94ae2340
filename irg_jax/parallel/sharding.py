"""Logical-axis sharding: parameters and activations name their axes, a rules table maps names to mesh axes.

Every parameter is created by :func:`param`, which puts one logical axis name per
dimension in Flax's own partitioning metadata (the Variable's ``out_sharding``), so Flax's
tools read them: ``nnx.get_partition_spec`` gives the logical names, and ``nnx.vmap(...,
transform_metadata={nnx.PARTITION_NAME: None})`` adds the stacked layers' axis (see
``irg_jax.model.decoder``). The names are not applied when a Variable is created
(``eager_sharding=False``): they are logical, and the rules table maps them to mesh axes
when the state's shardings are computed (:func:`state_shardings`).

The rules table (``config.sharding.rules``) is a sequence of ``(logical_name, mesh_axes)``
pairs, where ``mesh_axes`` is a mesh axis name, a tuple of names, or ``None`` (replicated).
The first rule for a name wins; names without a rule are replicated.
"""
from __future__ import annotations

import contextlib
import logging
import contextvars
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]
_ACTIVE_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("irg_rules", default=None)


def logical_metadata(logical_axes: Sequence[str | None]) -> dict[str, Any]:
    """Variable metadata naming each dimension's logical axis, for ``nnx.Variable(value, **...)``.

    Flax's ``out_sharding`` key, with eager sharding off: Flax would otherwise place the value
    at creation, reading the logical names as mesh axes."""
    return {"out_sharding": tuple(logical_axes), "eager_sharding": False}


def param(value: jax.Array, logical_axes: Sequence[str | None]) -> nnx.Param:
    """A parameter with one logical axis name per dimension."""
    if len(logical_axes) != np.ndim(value):
        raise ValueError(f"logical_axes {tuple(logical_axes)} do not match parameter rank {np.ndim(value)}")
    return nnx.Param(value, **logical_metadata(logical_axes))


def logical_axes(var: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names of a Variable (None: it names none and is replicated)."""
    names = var.get_metadata().get("out_sharding")
    return None if names is None else tuple(names)


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules, shape: Sequence[int] | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> P:
    """Map logical axis names to a PartitionSpec; a mesh axis is used at most once.

    With ``shape`` and ``mesh``, a dimension that the mesh axes do not divide stays
    replicated instead of failing at compile time (parameters: see :func:`state_shardings`,
    which reports those).
    """
    return _resolve(names, rules, shape, mesh)[0]


def _resolve(names, rules, shape, mesh) -> tuple[P, list[tuple[int, str, tuple[str, ...]]]]:
    """(spec, [(dim, logical name, mesh axes) the rules asked for but the dim size does not allow])."""
    if names is None:
        return P(), []
    table: dict[str, Any] = {}
    for name, axes in rules:
        table.setdefault(name, axes)
    used: set[str] = set()
    out, dropped = [], []
    for i, name in enumerate(names):
        axes = table.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        axes_t = tuple(a for a in axes_t if a not in used)
        if mesh is not None:
            axes_t = tuple(a for a in axes_t if mesh.shape[a] > 1)
            if shape is not None and axes_t:
                size = int(np.prod([mesh.shape[a] for a in axes_t]))
                if shape[i] % size:
                    dropped.append((i, name, axes_t))
                    axes_t = ()
        used.update(axes_t)
        out.append(None if not axes_t else (axes_t[0] if len(axes_t) == 1 else axes_t))
    return P(*out), dropped


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules, *,
                    max_unshardable_bytes: int | None = None) -> nnx.State:
    """NamedShardings for every leaf of an (abstract) nnx State, from its logical axes.

    A dimension the rules shard but the mesh does not divide is replicated; with
    ``max_unshardable_bytes``, a parameter larger than that which ends up so is an error
    that names it (no silent replication of large weights). Smaller ones are logged.
    """
    problems: list[str] = []
    small: list[str] = []

    def one(path, var):
        shape = tuple(getattr(var, "shape", None) or np.shape(var.get_value()))
        spec, dropped = _resolve(logical_axes(var), rules, shape, mesh)
        if dropped:
            dtype = getattr(var, "dtype", None) or np.asarray(var.get_value()).dtype
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            what = (f"{jax.tree_util.keystr(path)} {list(shape)} ({nbytes / 2**20:.1f} MiB): "
                    + "; ".join(f"dim {i} ({name}) = {shape[i]} is not divisible by mesh axes {axes} "
                                f"(size {int(np.prod([mesh.shape[a] for a in axes]))})" for i, name, axes in dropped))
            (problems if max_unshardable_bytes is not None and nbytes > max_unshardable_bytes else small).append(what)
        return NamedSharding(mesh, spec)

    out = jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    if problems:
        raise ValueError(
            f"{len(problems)} parameter(s) over sharding.max_unshardable_mib="
            f"{max_unshardable_bytes / 2**20:g} cannot be sharded as the rules say on mesh "
            f"{dict(mesh.shape)} (change the mesh, the rules or the limit):\n  " + "\n  ".join(problems))
    if small:
        logging.info("%d small parameter(s) replicated on a dimension the rules shard, e.g. %s",
                     len(small), small[0])
    return out


def replicated_share(abstract: Any, shardings: Any) -> tuple[float, float]:
    """(bytes held per device, of which fully replicated) for a tree of arrays and their shardings."""
    per_device = replicated = 0.0
    for x, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        nbytes = float(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        shard = float(np.prod(sh.shard_shape(tuple(x.shape)))) * np.dtype(x.dtype).itemsize
        per_device += shard
        if sh.is_fully_replicated and len(sh.device_set) > 1:
            replicated += nbytes
    return per_device, replicated


def replicated_fraction(state: Any) -> float:
    """Fraction of parameter bytes that are fully replicated across the devices of their sharding."""
    total = replicated = 0
    for leaf in jax.tree.leaves(state):
        if not isinstance(leaf, jax.Array):
            continue
        nbytes = leaf.size * leaf.dtype.itemsize
        total += nbytes
        if leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) > 1:
            replicated += nbytes
    return replicated / max(total, 1)


def bytes_per_device(state: Any) -> dict[int, int]:
    """Parameter bytes held by each device (from addressable shards)."""
    out: dict[int, int] = {}
    for leaf in jax.tree.leaves(state):
        if not isinstance(leaf, jax.Array):
            continue
        for shard in leaf.addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.size * shard.data.dtype.itemsize
    return out


@contextlib.contextmanager
def activation_rules(rules: Rules):
    """Make ``rules`` the table used by :func:`constrain` inside this context."""
    token = _ACTIVE_RULES.set(tuple(rules))
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def _active() -> tuple[Rules | None, Any]:
    """(the active rules, the current abstract mesh), or (None, None) when either is missing."""
    rules = _ACTIVE_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh is None or mesh.empty:
        return None, None
    return rules, mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical names; a no-op without a mesh or rules."""
    rules, mesh = _active()
    if mesh is None:
        return x
    spec = logical_to_spec(names, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def per_device(fn, args: Sequence[Any], names: Sequence[Any], out_names: Any):
    """``fn(*args)`` run on each device's own shard of its arguments (``jax.shard_map``).

    ``names`` gives each argument's logical axis names (a pytree of name tuples matching the
    argument's arrays), ``out_names`` the output's. Meant for computations whose control flow depends
    on the data (per-pack loop trip counts) or that must see whole sequences (a Pallas kernel,
    which the SPMD partitioner cannot split). Under the partitioner such a loop may hold
    collectives, and XLA:CPU runs independent thunks concurrently, so a collective inside a
    loop can meet another collective of the step in a different order on different devices
    (a deadlock; found with the MFU pair count's all-reduce against the forward's all-to-all).
    Inside ``shard_map`` each device runs its own loop on local data and no collective exists.
    Axes the rules do not use for an argument are replicated into the call; a dimension the
    mesh axes do not divide stays whole (the output's shapes, from ``jax.eval_shape`` at trace
    time, decide that for ``out_names``). Without a mesh of more than one device, or without
    active rules, ``fn`` is called directly.
    """
    rules, mesh = _active()
    if mesh is None or mesh.size == 1:
        return fn(*args)
    is_names = lambda x: isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)  # noqa: E731
    specs = jax.tree.map(lambda n, a: logical_to_spec(n, rules, a.shape, mesh), list(names), list(args),
                         is_leaf=is_names)
    out_shape = jax.eval_shape(fn, *args)
    out_spec = jax.tree.map(lambda n, a: logical_to_spec(n, rules, a.shape, mesh), out_names, out_shape,
                            is_leaf=is_names)
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs), out_specs=out_spec)(*args)


def splits(name: str, size: int) -> bool:
    """Whether the active rules shard a dimension of ``size`` named ``name`` on the current mesh."""
    rules, mesh = _active()
    if mesh is None:
        return False
    return logical_to_spec((name,), rules, (size,), mesh) != P(None)
