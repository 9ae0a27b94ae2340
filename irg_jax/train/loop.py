"""The training loop: build, (re)start, step, log, checkpoint. Short on purpose.

Everything configurable lives in the config; everything reusable lives in its own
module (setup: model, state, shardings and the jitted step, shared with the planner and the
benches; checkpointing, metrics, mfu, export). Between log and checkpoint steps the loop reads
nothing back from the devices (the step sums its metrics on device; implicit transfers are
disallowed around it).

Multi-process (``jax.distributed``, see ``irg_jax.runtime``): every process runs this loop
over the same global arrays and takes part in every step, checkpoint save and restore, sample
grid and the export; process 0 alone writes metrics, TensorBoard and PNG files. Host-side
decisions that could differ between processes are agreed on collectively: the resume step,
whether a SIGTERM arrived and whether an asynchronous checkpoint save failed (both checked on
every process at each log and checkpoint step).

Start-up checks come first (config vs. the resumed checkpoint's, model, tokenizer, data,
restore); only then is the resolved config written to the workdir (``irg_jax.config.resume``).
A failed checkpoint save stops the run at the step where it is found (``checkpointing``).
"""
from __future__ import annotations

import signal
import time

import jax
import ml_collections
from absl import logging
from clu import parameter_overview

from irg_jax import runtime
from irg_jax.config import resume as resume_lib
from irg_jax.model.bagel import training_flops
from irg_jax.parallel.mesh import build_mesh
from irg_jax.parallel.sharding import replicated_share
from irg_jax.inference.runner import check_tokenizer
from irg_jax.train import checkpointing, export, init_from
from irg_jax.train import mfu as mfu_lib
from irg_jax.train.metrics import MetricWriter, ProgressLine
from irg_jax.train.samples import TrainingSamples
from irg_jax.train.setup import AVERAGED, train_setup


class NonFiniteError(RuntimeError):
    """Raised after ``nan_guard.max_consecutive`` non-finite steps in a row."""


class _Sigterm:
    """Turns SIGTERM into a flag the loop checks between steps (save, then exit 0).

    With one process the flag is read after every step. With several, processes may get the
    signal at different steps, so they stop only where they agree: at the sync points (log and
    checkpoint steps), where one collective tells every process whether any got it."""

    def __init__(self):
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting")
        self.received = True

    def stop(self, sync_point: bool) -> bool:
        if jax.process_count() == 1:
            return self.received
        return sync_point and runtime.any_process(self.received)

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


class _NonFiniteGuard:
    """Logs skipped (non-finite) updates; raises after ``max_consecutive`` in a row.

    The step skips an update whose loss, gradient norm or new parameters are not finite, so the
    state (and every checkpoint) stays the last good one. The step counts the skipped steps in its
    metrics window (``irg_jax.train.setup``); this reads the window at log and checkpoint steps
    only (no host sync in between), and always before a checkpoint is written."""

    def __init__(self, max_consecutive: int, ckpt: checkpointing.Checkpointer):
        self.max_consecutive, self.ckpt = max_consecutive, ckpt
        self._reported = -1  # the last skipped step already logged

    def check(self, window: dict, streak: int) -> None:
        """``window``: the fetched window (host values); ``streak``: the last step's streak."""
        skipped, last = int(window["skipped"]), int(window["last_skipped"])
        if not skipped or last == self._reported:
            return
        self._reported = last
        logging.warning("%d non-finite loss, gradient or update in the %d steps to step %d; updates skipped "
                        "(the last at step %d, %d in a row now)", skipped, int(window["steps"]),
                        int(window["iteration"]), last, streak)
        stop = int(window["stop_at"])
        if stop >= 0:
            self.ckpt.wait()
            latest = self.ckpt.manager.latest_step()
            where = (f"the latest checkpoint, step {latest} in {self.ckpt.directory}, holds the last good state"
                     if latest is not None else f"no checkpoint was saved yet in {self.ckpt.directory}")
            first = stop - self.max_consecutive + 1
            raise NonFiniteError(
                f"{self.max_consecutive} consecutive non-finite steps at step {stop} (steps {first}-{stop} skipped; "
                f"the parameters are those after step {first - 1}); {where}")


def step_flops(config: ml_collections.ConfigDict, budgets) -> float:
    """Analytic model FLOPs of one optimiser step at the configured token budgets."""
    return float(training_flops(config.model, batch=config.batch_size, und_len=budgets.und_len,
                                gen_len=budgets.gen_len, vit_len=budgets.vit_len, ce_len=budgets.ce_len))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train until ``config.total_steps``; returns the last logged scalars."""
    from irg_jax.data import pipeline  # imported late: keeps `--help` fast
    from irg_jax.data.tokenizer import load_tokenizer

    mesh = build_mesh(config.mesh)
    primary = runtime.is_primary()
    writer = MetricWriter(workdir, enabled=primary)
    logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].device_kind)

    setup = train_setup(config, mesh, autoencoder=init_from.load_autoencoder(config))
    setup.place_constants()
    bundle = setup.bundle
    # The parameter table (name, shape, dtype, size, PartitionSpec) from the abstract state: no
    # device work, so process 0 alone can write it.
    parameter_overview.log_parameter_overview(setup.abstract_state.params, include_stats="sharding",
                                              msg="model parameters", jax_logging_process=0)
    held, copied = replicated_share(setup.abstract_state, setup.state_shardings)
    logging.info("train state: %.2f GiB per device, of which %.2f GiB (%.1f%%) fully replicated",
                 held / 2**30, copied / 2**30, 100 * copied / max(held, 1))

    tokenizer = load_tokenizer(config.data.tokenizer_path)
    check_tokenizer(tokenizer, config.model, f"config.data.tokenizer_path={config.data.tokenizer_path}")
    data_iter, budgets = pipeline.make_train_iterator(
        config.data, config.model, tokenizer, seed=config.seed, batch_size=config.batch_size,
        sharding=setup.batch_sharding)
    logging.info("data: process %d of %d builds batch rows [%d, %d) of %d", jax.process_index(), jax.process_count(),
                 data_iter.rows[0], data_iter.rows[-1] + 1, config.batch_size)
    # The first cross-process collectives follow: start them together (see runtime.SyncedJit).
    runtime.barrier("train/start")
    ckpt = checkpointing.Checkpointer(workdir, config)
    start = ckpt.latest_step()
    if start is not None:
        for note in resume_lib.check_resume(ckpt.saved_config(start), config, start, workdir):
            logging.warning("%s", note)
        logging.info("resuming from step %d in %s", start, ckpt.directory)
        state = ckpt.restore(start, setup.abstract_state, data_iter)
    else:
        start = 0
        params = (init_from.load_params(config.checkpoint, bundle, mesh, data_cfg=config.data)
                  if config.checkpoint.init_from else setup.init_params())
        state = setup.create_state(params)

    step_fn = runtime.SyncedJit(setup.step, "train_step")
    if primary:  # the start-up checks passed: record the config this run trains with
        written = resume_lib.record(config, workdir, start)
        logging.info("resolved config written to %s" if written else "resolved config unchanged (%s)",
                     written or workdir)

    # Only process 0 reports MFU; on CPU the peak is a timed matmul, which the others can skip.
    peak, peak_source = mfu_lib.peak_flops_per_device() if primary else (float("nan"), "not measured here")
    peak_devices = 1 if jax.devices()[0].platform == "cpu" else jax.device_count()  # CPU: one host peak
    logging.info("peak %.3g FLOP/s per device (%s)", peak, peak_source)
    progress = ProgressLine(config.total_steps, start)
    sigterm = _Sigterm()
    last: dict = {}
    guard = _NonFiniteGuard(config.nan_guard.max_consecutive, ckpt)
    samples = TrainingSamples(config, bundle, tokenizer, workdir, writer, mesh) if config.sample_every else None
    window, window_t0, metrics = setup.new_window(start), time.perf_counter(), None
    checked = True  # False while the window holds steps the non-finite guard has not seen
    stopped = False
    try:
        with setup.active():
            for step in range(start, config.total_steps):
                # The batch is put on the devices by the data iterator (explicitly; in a multi-process
                # run through process-local data, which the guard would count as implicit). Between sync
                # points nothing else moves between host and device: an implicit transfer is an error.
                batch = next(data_iter)
                with jax.transfer_guard("disallow"):
                    state, window, metrics = step_fn(state, batch, window, *setup.constants)
                checked = False
                done = step + 1
                log_step = done % config.log_every == 0 or done == config.total_steps
                save_step = done % config.checkpoint_every == 0 or done == config.total_steps
                if log_step or save_step:
                    # The one read-back between sync points: the window and the last step's metrics.
                    host_window, host_metrics = jax.device_get((window, metrics))
                    guard.check(host_window, int(host_metrics["nonfinite_streak"]))
                    checked = True
                if log_step:
                    elapsed = time.perf_counter() - window_t0
                    n = int(host_window["steps"])
                    scalars = {k: float(v) for k, v in host_metrics.items()}
                    sums = host_window["sums"]
                    scalars.update({k: float(sums[k]) / n for k in AVERAGED})  # window means
                    # MFU counts the attention the mask allows (model FLOPs) and the tiles the kernel
                    # computes (hardware FLOPs): the window's mean (allowed, computed) pairs per step.
                    scalars.update(
                        step_time=elapsed / n, tokens_per_s=float(sums["real_tokens"]) / elapsed,
                        **mfu_lib.mfu_scalars(config.model, config.batch_size, budgets[-1],
                                              mfu_lib.window_pairs(sums, n), elapsed / n, peak, peak_devices),
                        nonfinite_total=int(jax.device_get(state.nonfinite_total)),
                        compilations=step_fn.num_compiled, **data_iter.metrics())
                    writer.write(done, scalars)
                    progress.log(done, scalars)
                    last = scalars
                    window, window_t0 = setup.new_window(done), time.perf_counter()
                if samples and done % config.sample_every == 0:
                    samples(done, state.ema or state.params)
                stopped = sigterm.stop(sync_point=save_step or log_step)
                # A failed asynchronous save stops the run here (a flag read while one runs).
                ckpt.poll(sync_point=save_step or log_step)
                if save_step or stopped:
                    if not checked:  # never checkpoint past a step the non-finite guard has not seen
                        host_window, host_metrics = jax.device_get((window, metrics))
                        guard.check(host_window, int(host_metrics["nonfinite_streak"]))
                    ckpt.save(done, state, data_iter, force=True)
                if stopped:
                    break
        ckpt.wait()
        if not stopped:  # every process writes its shards of the export
            export.export_for_inference(state, bundle, config, workdir,
                                        ae_source=init_from.autoencoder_file(config))
    finally:
        sigterm.restore()
        ckpt.close()
        writer.close()
    return last
