"""Orbax checkpoints: train state, Grain iterator and config as three items of one step.

- asynchronous saves, keep policy from ``config.checkpoint.keep``;
- auto-resume from the latest *complete* step in ``workdir/checkpoints`` (Orbax writes
  to a temporary directory and renames on commit, so a killed save is never picked);
- restore into any mesh: the target's shardings come from the current run, and Orbax
  reshards on read.

Multi-process: every process calls every method (Orbax saves and restores the array shards
collectively and writes the shared files from process 0; the Grain iterator state is one file
per process). The resume step is checked to be the same on every process.
"""
from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from irg_jax import runtime


class Checkpointer:
    def __init__(self, workdir: str | pathlib.Path, config: ml_collections.ConfigDict):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.keep, create=True,
            enable_async_checkpointing=config.checkpoint.async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._config_json = config.to_dict()

    def latest_step(self) -> int | None:
        """The latest complete step, the same on every process (a collective when multi-process)."""
        return runtime.agreed_int(self.manager.latest_step(), f"the latest checkpoint in {self.directory}")

    def save(self, step: int, state: Any, data_iterator: Any | None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state),
                 "config": ocp.args.JsonSave(_jsonable(self._config_json))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> Any:
        """Restore into ``abstract_state``'s shapes, dtypes and shardings (any mesh)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
