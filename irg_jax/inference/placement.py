"""Where generation arrays live on a device mesh (the training mesh and its logical-axis rules).

- prompt rows (ids, lengths, PRNG keys, and everything computed from them: KV caches,
  noise, latents, images) split over the mesh axes of the ``batch`` rule, ``('data',
  'fsdp')`` by default, as training splits its packs;
- model parameters sharded by the same rules as in training (``state_shardings``);
- the frozen autoencoder, the sin-cos tables and the scalar settings replicated.

A batch whose size the data-parallel size does not divide is padded by repeating its last
row; the caller drops the padding (:meth:`Placement.pad_rows`). Inside the compiled
program, :func:`constrain_rows` and :func:`constrain_cache` pin the rows' sharding (they
are no-ops without a mesh). The jitted calls run under :meth:`Placement.context`:
``jax.set_mesh(mesh)`` plus the activation rules.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from irg_jax.model.kv_cache import KVCache
from irg_jax.parallel import sharding

DEFAULT_BATCH_AXES = ("data", "fsdp")
CACHE_AXES = (None, "batch", None, "kv_heads", None)  # keys/values [layers, B, capacity, kv_heads, head_dim]


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def batch_axes(rules: sharding.Rules) -> tuple[str, ...]:
    """Mesh axes of the ``batch`` rule (first match, like :func:`sharding.logical_to_spec`)."""
    for name, axes in rules:
        if name == "batch":
            return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return DEFAULT_BATCH_AXES


@dataclasses.dataclass(frozen=True)
class Placement:
    mesh: jax.sharding.Mesh
    rules: tuple

    @classmethod
    def make(cls, mesh: jax.sharding.Mesh, rules: sharding.Rules | None = None) -> "Placement":
        if rules is None:
            from irg_jax.config import DEFAULT_RULES
            rules = DEFAULT_RULES
        return cls(mesh, tuple((name, tuple(a) if isinstance(a, list) else a) for name, a in rules))

    @property
    def row_axes(self) -> tuple[str, ...]:
        return tuple(a for a in batch_axes(self.rules) if a in self.mesh.shape)

    @property
    def data_parallel(self) -> int:
        """How many ways the prompt rows are split."""
        return math.prod(self.mesh.shape[a] for a in self.row_axes)

    def padded(self, rows: int) -> int:
        return -(-rows // self.data_parallel) * self.data_parallel

    def rows(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(self.row_axes or None))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def cache_sharding(self, shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, sharding.logical_to_spec(CACHE_AXES, self.rules, shape, self.mesh))

    def context(self) -> contextlib.ExitStack:
        """``with placement.context():`` around jitted calls (trace, lower and run)."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(sharding.activation_rules(self.rules))
        return stack

    # ---------------------------------------------------------------- host -> mesh

    def pad_rows(self, x: Any) -> Any:
        """Host array [n, ...] (or typed PRNG keys) -> [padded(n), ...], repeating the last row."""
        if _is_key(x):
            data = self.pad_rows(np.asarray(jax.random.key_data(x)))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        x = np.asarray(x)
        extra = self.padded(x.shape[0]) - x.shape[0]
        return x if not extra else np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])

    def put(self, tree: Any, shardings: Any) -> Any:
        """Place a pytree: arrays are transferred (host values must agree across processes),
        ``ShapeDtypeStruct`` leaves get the sharding (for lowering without allocating)."""
        return jax.tree.map(_put_one, tree, shardings)

    def put_rows(self, tree: Any) -> Any:
        return self.put(tree, jax.tree.map(lambda _: self.rows(), tree))

    def put_replicated(self, tree: Any) -> Any:
        return self.put(tree, jax.tree.map(lambda _: self.replicated(), tree))

    def put_model_state(self, state: Any) -> Any:
        """An nnx State of the model: parameters by the rules, everything else replicated."""
        shardings = sharding.state_shardings(state, self.mesh, self.rules)  # one per Variable
        return jax.tree.map(lambda s, var: jax.tree.map(lambda x: _put_one(x, s), var), shardings, state)

    def row_shardings(self, tree: Any) -> Any:
        """Shardings for a tree of row-major arrays; a :class:`KVCache` is split on its batch dim."""
        def one(x):
            if isinstance(x, KVCache):
                kv = self.cache_sharding(x.keys.shape)
                return KVCache(kv, kv, self.rows(), self.rows())
            return self.rows() if np.ndim(x) else self.replicated()
        return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, KVCache))


def _put_one(x, s):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    if _is_key(x):
        return jax.random.wrap_key_data(_put_one(jax.random.key_data(x), s), impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and not (jax.process_count() > 1 and x.is_fully_addressable):
        return jax.device_put(x, s)  # device to device, or a global array resharded
    host = np.asarray(x)  # a host value, the same on every process -> a global array
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])


# -------------------------------------------------------------------- inside the program

def constrain_rows(x: jax.Array) -> jax.Array:
    """Pin an array's leading (row) dimension to the batch axes."""
    return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


def constrain_cache(cache: KVCache) -> KVCache:
    return KVCache(sharding.constrain(cache.keys, CACHE_AXES), sharding.constrain(cache.values, CACHE_AXES),
                   constrain_rows(cache.length), constrain_rows(cache.rope))


def to_host(tree: Any) -> Any:
    """Device arrays -> numpy, gathering rows that live on other hosts (every process gets all)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
