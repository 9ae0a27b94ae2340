"""The train setup, built once: mesh, model, optimiser, abstract state, shardings, the jitted step.

:func:`train_setup` is what the training loop, the planner (``irg_jax.plan``), the benches
and the tests all call, so the step they run, plan or time is the same program:

- the state is ``TrainState`` with params, EMA and Adam moments sharded by the logical-axis
  rules (``config.sharding.rules``), scalars replicated; it is donated to the step;
- the batch is sharded over ``('data', 'fsdp')`` (one pack per row);
- the constants (the frozen autoencoder's state and the fixed sin-cos tables) are jit
  arguments, replicated on every device of the mesh, not closed over (closed-over arrays
  become XLA constants that sit on one device and that ``memory_analysis`` does not count);
- the step also adds its metrics into a small on-device *window* (sums since the last log,
  non-finite steps, and the attention pairs MFU counts: ``irg_jax.train.mfu``), so the loop
  reads nothing back between log and checkpoint steps.

``step(state, batch, window, ae_state, tables) -> (state, window, metrics)``; state and window are
donated; ``metrics`` are the step's own scalars (replicated, left on the devices).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from irg_jax.parallel.sharding import activation_rules
from irg_jax.train import mfu as mfu_lib
from irg_jax.train import model_setup
from irg_jax.train import state as state_lib
from irg_jax.train.optimizer import make_optimizer, step_frozen_fn
from irg_jax.train.step import make_train_step

BATCH_AXES = ("data", "fsdp")
# Metrics averaged over the steps since the last log (sums in the window, divided by its steps).
AVERAGED = ("loss", "ce", "mse", "grad_norm")


def with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree``'s leaves carrying ``shardings``."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def new_window(iteration: int) -> dict:
    """An empty metrics window (host numpy) starting at loop iteration ``iteration``."""
    i32 = lambda v: np.asarray(v, np.int32)  # noqa: E731
    return {
        "steps": i32(0),
        "iteration": i32(iteration),      # loop iterations done (the loop's `done`)
        "sums": {k: np.zeros((), np.float32) for k in AVERAGED + ("real_tokens",) + mfu_lib.PAIR_SUMS},
        "skipped": i32(0),                # non-finite (skipped) steps in this window
        "last_skipped": i32(-1),          # iteration of the last of them
        "stop_at": i32(-1),               # iteration where the non-finite streak reached the limit
    }


def _accumulate(window: dict, metrics: dict, max_streak: int) -> dict:
    done = window["iteration"] + 1
    skipped = jnp.logical_not(metrics["finite"])
    hit = (metrics["nonfinite_streak"] >= max_streak) & (window["stop_at"] < 0)
    return {
        "steps": window["steps"] + 1,
        "iteration": done,
        "sums": {k: v + metrics[k].astype(jnp.float32) for k, v in window["sums"].items()},
        "skipped": window["skipped"] + skipped.astype(jnp.int32),
        "last_skipped": jnp.where(skipped, done, window["last_skipped"]),
        "stop_at": jnp.where(hit, done, window["stop_at"]),
    }


@dataclasses.dataclass
class TrainSetup:
    """Everything the train step needs, built by :func:`train_setup` (see the module docstring)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: tuple
    bundle: model_setup.ModelBundle
    init_params: Callable[[], Any]       # sharded random init (nothing materialised unsharded)
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: state_lib.TrainState  # ShapeDtypeStructs with their shardings
    state_shardings: state_lib.TrainState
    batch_sharding: NamedSharding
    replicated: NamedSharding
    constants: tuple                     # (ae_state, tables): abstract (with shardings) or placed arrays
    constant_shardings: tuple
    abstract_window: dict                # ShapeDtypeStructs (replicated)
    step: Any                            # jitted (state, batch, window, ae_state, tables) -> (state, window, metrics)

    @contextlib.contextmanager
    def active(self):
        """The mesh and the activation rules the step is traced under."""
        with jax.set_mesh(self.mesh), activation_rules(self.rules):
            yield

    def create_state(self, params: Any) -> state_lib.TrainState:
        """The initial train state from ``params`` (donated), laid out by ``state_shardings``."""
        create = lambda p: state_lib.create(p, self.tx, jax.random.key(self.config.seed), self.config.ema.enabled)
        with jax.set_mesh(self.mesh):
            return jax.jit(create, out_shardings=self.state_shardings, donate_argnums=0)(params)

    def new_window(self, iteration: int) -> dict:
        """An empty metrics window on the devices (an explicit transfer)."""
        return jax.device_put(new_window(iteration), self.replicated)

    def abstract_batch(self, budgets) -> dict:
        """ShapeDtypeStructs of a batch of ``config.batch_size`` packs at ``budgets``, sharded."""
        from irg_jax.data import packed_batch
        return {k: jax.ShapeDtypeStruct((self.config.batch_size,) + shape, dtype, sharding=self.batch_sharding)
                for k, (shape, dtype) in packed_batch.array_specs(budgets).items()}

    def lower(self, budgets):
        """The step lowered on abstract inputs (nothing allocated), as the loop would run it."""
        with self.active():
            return self.step.lower(self.abstract_state, self.abstract_batch(budgets), self.abstract_window,
                                   *self.abstract_constants())

    def abstract_constants(self) -> tuple:
        return tuple(with_shardings(c, s) for c, s in zip(self.constants, self.constant_shardings))

    def place_constants(self) -> None:
        """Put the frozen autoencoder and the tables on the mesh (replicated), once; the bundle then
        refers to the placed copies (sample grids and the export use them too)."""
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.constants)):
            raise ValueError("train_setup(..., autoencoder=<abstract>): the constants are abstract (planning only)")
        self.constants = tuple(jax.device_put(c, s) for c, s in zip(self.constants, self.constant_shardings))
        ae_graphdef = nnx.graphdef(self.bundle.autoencoder)
        self.bundle = dataclasses.replace(self.bundle, autoencoder=nnx.merge(ae_graphdef, self.constants[0]),
                                          consts=self.constants[1])


def train_setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                autoencoder: nnx.Module | None = None) -> TrainSetup:
    """Build the train setup for ``config`` on ``mesh``.

    ``autoencoder``: the frozen autoencoder (``init_from.load_autoencoder(config)`` in the loop);
    an abstract one (``nnx.eval_shape``) for planning; None builds a randomly initialised one.
    """
    rules = tuple(tuple(r) for r in config.sharding.rules)
    bundle, init_params = model_setup.build(config.model, mesh, rules, config.seed, autoencoder=autoencoder,
                                            max_unshardable_mib=config.sharding.get("max_unshardable_mib"))
    tx, schedule = make_optimizer(config, bundle.abstract_params)
    replicated = NamedSharding(mesh, P())
    abstract_state = jax.eval_shape(
        lambda p: state_lib.create(p, tx, jax.random.key(config.seed), config.ema.enabled), bundle.abstract_params)
    state_shardings = state_lib.shardings(abstract_state, bundle.param_shardings, replicated, tx)
    batch_sharding = NamedSharding(mesh, P(BATCH_AXES))

    ae_graphdef, ae_state = nnx.split(bundle.autoencoder)
    constants = (ae_state, bundle.consts)
    constant_shardings = tuple(jax.tree.map(lambda _: replicated, c) for c in constants)
    step_frozen = step_frozen_fn(bundle.abstract_params, config.freeze)
    max_streak = int(config.nan_guard.max_consecutive)

    template = dataclasses.replace(bundle, autoencoder=None, consts=None)  # the step holds no arrays

    def step(state, batch, window, ae_state, tables):
        traced = dataclasses.replace(template, autoencoder=nnx.merge(ae_graphdef, ae_state), consts=tables)
        train_step = make_train_step(model_setup.make_forward(traced), tx, schedule, config, step_frozen)
        state, metrics = train_step(state, batch)
        summed = {**metrics, **mfu_lib.batch_pair_sums(batch, config.model.attention)}  # pairs: window only
        return state, _accumulate(window, summed, max_streak), metrics

    window_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), new_window(0))
    window_shardings = jax.tree.map(lambda _: replicated, window_shapes)
    jitted = jax.jit(step, in_shardings=(state_shardings, batch_sharding, window_shardings) + constant_shardings,
                     out_shardings=(state_shardings, window_shardings, replicated), donate_argnums=(0, 2))
    return TrainSetup(config=config, mesh=mesh, rules=rules, bundle=bundle, init_params=init_params, tx=tx,
                      schedule=schedule, abstract_state=with_shardings(abstract_state, state_shardings),
                      state_shardings=state_shardings, batch_sharding=batch_sharding, replicated=replicated,
                      constants=constants, constant_shardings=constant_shardings,
                      abstract_window=with_shardings(window_shapes, window_shardings), step=jitted)
