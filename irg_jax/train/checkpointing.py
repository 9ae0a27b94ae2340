"""Orbax checkpoints: train state, Grain iterator and config as three items of one step.

- asynchronous saves, keep policy from ``config.checkpoint.keep``;
- auto-resume from the latest *complete* step in ``workdir/checkpoints`` (Orbax writes
  to a temporary directory and renames on commit, so a killed save is never picked);
- restore into any mesh: the target's shardings come from the current run, and Orbax
  reshards on read.

- a failed save stops the run with the save's own error (:class:`CheckpointSaveError`), as soon
  as it is known: :meth:`Checkpointer.poll`, called after every step, reads Orbax's
  "save in progress" flag (a lock and a bool, no I/O, no device sync) and only once the
  background save has ended joins it, which re-raises its error. Orbax's own
  ``check_for_errors`` cannot serve here: its finalize thread consumes the error, which then
  surfaces only from ``wait_until_finished`` (the next save, up to ``checkpoint_every`` steps
  later). Orbax removes the checkpoints that the keep policy drops only after a save commits,
  so the previous one is still on disk; the failed step's partial folder is removed, to free
  the space it took, and the message names the intact step to resume from.

Multi-process: every process calls every method (Orbax saves and restores the array shards
collectively and writes the shared files from process 0; the Grain iterator state is one file
per process). The resume step is checked to be the same on every process. A failed save found
by :meth:`Checkpointer.poll` stops every process at the same sync point (log and checkpoint
steps), where one collective tells all of them whether any save failed.
"""
from __future__ import annotations

import pathlib
import shutil
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from absl import logging

from irg_jax import runtime


class CheckpointSaveError(RuntimeError):
    """A checkpoint save failed (the cause is chained); the message names the step and the
    checkpoint to resume from."""


class Checkpointer:
    def __init__(self, workdir: str | pathlib.Path, config: ml_collections.ConfigDict):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.keep, create=True,
            enable_async_checkpointing=config.checkpoint.async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._config_json = config.to_dict()
        self._in_flight: int | None = None  # step of a save not yet known to have finished
        self._failed: CheckpointSaveError | None = None  # found by poll, not yet raised (multi-process)

    def latest_step(self) -> int | None:
        """The latest complete step, the same on every process (a collective when multi-process)."""
        return runtime.agreed_int(self.manager.latest_step(), f"the latest checkpoint in {self.directory}")

    def saved_config(self, step: int) -> dict | None:
        """The config stored with ``step`` (a JSON dict), or None if that checkpoint has none."""
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except (KeyError, FileNotFoundError, ValueError) as e:
            logging.warning("checkpoint %d in %s: no readable config item (%s)", step, self.directory, e)
            return None
        return restored["config"]

    def save(self, step: int, state: Any, data_iterator: Any | None, force: bool = False) -> bool:
        """Start saving ``step`` (asynchronously when configured), after the previous save has
        finished; raises :class:`CheckpointSaveError` if that one or this one fails."""
        self.wait()
        items = {"state": ocp.args.StandardSave(state),
                 "config": ocp.args.JsonSave(_jsonable(self._config_json))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # the synchronous part (e.g. creating the folder) failed
            raise self._save_failed(step, e) from e
        if saved:
            self._in_flight = step
        return saved

    def poll(self, sync_point: bool = True) -> None:
        """Raise :class:`CheckpointSaveError` if the last asynchronous save has failed. Never
        waits for a running save. With several processes a failure is raised only at a sync
        point, on every process at once (a collective there: every process must call it)."""
        if self._failed is None and self._in_flight is not None and not self.manager.is_saving_in_progress():
            try:
                self._finish()
            except CheckpointSaveError as e:
                self._failed = e
        if jax.process_count() == 1:
            failed = self._failed is not None
        else:
            failed = sync_point and runtime.any_process(self._failed is not None)
        if failed:
            error, self._failed = self._failed, None
            if error is None:
                raise CheckpointSaveError(f"a checkpoint save failed on another process; see its log. The "
                                          f"latest complete checkpoint in {self.directory} is {_committed(self.directory)}")
            raise error

    def _finish(self) -> None:
        step, self._in_flight = self._in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(step, e) from e

    def _save_failed(self, step: int | None, error: BaseException) -> CheckpointSaveError:
        """Keep what is on disk usable: drop the failed step's partial folder (it holds space and is
        never picked on resume), and name the latest complete step, which Orbax has not removed."""
        if step is not None and runtime.is_primary():
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
        intact = _committed(self.directory)
        where = (f"the previous checkpoint, step {intact} in {self.directory}, is intact: fix the cause and "
                 f"re-run the same command to resume from it" if intact is not None
                 else f"no earlier checkpoint in {self.directory}")
        return CheckpointSaveError(f"checkpoint save at step {step} failed: {type(error).__name__}: {error}; {where}")

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> Any:
        """Restore into ``abstract_state``'s shapes, dtypes and shardings (any mesh)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def wait(self) -> None:
        """Block until the last save has finished; raises :class:`CheckpointSaveError` if it failed."""
        if self._failed is not None:
            error, self._failed = self._failed, None
            raise error
        self._finish()

    def close(self) -> None:
        """Wait for the last save and release Orbax's threads. A save error is logged, not raised:
        close runs in ``finally`` blocks, where raising would hide the error that got there."""
        try:
            self._finish()
        except CheckpointSaveError as e:
            logging.error("%s", e)
        self.manager.close()


def _committed(directory: pathlib.Path) -> int | None:
    """The latest committed step on disk (Orbax renames a finished save to the bare step number)."""
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
    return max(steps, default=None)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
