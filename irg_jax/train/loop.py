"""The training loop: build, (re)start, step, log, checkpoint. Short on purpose.

Everything configurable lives in the config; everything reusable lives in its own
module (model_setup, step, optimizer, checkpointing, metrics, mfu, export).

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
import jax.numpy as jnp
import ml_collections
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from irg_jax import runtime
from irg_jax.config import resume as resume_lib
from irg_jax.model.bagel import training_flops
from irg_jax.parallel.mesh import build_mesh
from irg_jax.parallel.sharding import activation_rules, replicated_share
from irg_jax.inference.runner import check_tokenizer
from irg_jax.train import checkpointing, export, init_from, model_setup
from irg_jax.train import mfu as mfu_lib
from irg_jax.train import state as state_lib
from irg_jax.train.metrics import AVERAGED, MetricWriter, ProgressLine, TrainMetrics
from irg_jax.train.optimizer import make_optimizer, step_frozen_fn
from irg_jax.train.samples import TrainingSamples
from irg_jax.train.step import make_train_step


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
    state (and every checkpoint) stays the last good one."""

    def __init__(self, max_consecutive: int, ckpt: checkpointing.Checkpointer):
        self.max_consecutive, self.ckpt = max_consecutive, ckpt

    def check(self, step: int, metrics: dict) -> None:
        streak = int(metrics["nonfinite_streak"])
        if not streak:
            return
        logging.warning("step %d: non-finite loss, gradient or update; update skipped (%d in a row)", step, streak)
        if streak >= self.max_consecutive:
            self.ckpt.wait()
            latest = self.ckpt.manager.latest_step()
            where = (f"the latest checkpoint, step {latest} in {self.ckpt.directory}, holds the last good state"
                     if latest is not None else f"no checkpoint was saved yet in {self.ckpt.directory}")
            first = step - streak + 1
            raise NonFiniteError(
                f"{streak} consecutive non-finite steps at step {step} (steps {first}-{step} skipped; the "
                f"parameters are those after step {first - 1}); {where}")


def step_flops(config: ml_collections.ConfigDict, budgets) -> float:
    """Analytic model FLOPs of one optimiser step at the configured token budgets."""
    return float(training_flops(config.model, batch=config.batch_size, und_len=budgets.und_len,
                                gen_len=budgets.gen_len, vit_len=budgets.vit_len, ce_len=budgets.ce_len))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train until ``config.total_steps``; returns the last logged scalars."""
    from irg_jax.data import pipeline  # imported late: keeps `--help` fast
    from irg_jax.data.tokenizer import load_tokenizer

    mesh = build_mesh(config.mesh)
    rules = tuple(tuple(r) for r in config.sharding.rules)
    primary = runtime.is_primary()
    writer = MetricWriter(workdir, enabled=primary)
    logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].device_kind)

    bundle, init_params = model_setup.build(config.model, mesh, rules, config.seed,
                                            autoencoder=init_from.load_autoencoder(config),
                                            max_unshardable_mib=config.sharding.get("max_unshardable_mib"))
    tx, schedule = make_optimizer(config, bundle.abstract_params)
    replicated = NamedSharding(mesh, P())
    abstract_state = jax.eval_shape(
        lambda p: state_lib.create(p, tx, jax.random.key(config.seed), config.ema.enabled), bundle.abstract_params)
    state_shardings = state_lib.shardings(abstract_state, bundle.param_shardings, replicated)
    held, copied = replicated_share(abstract_state, state_shardings)
    logging.info("train state: %.2f GiB per device, of which %.2f GiB (%.1f%%) fully replicated",
                 held / 2**30, copied / 2**30, 100 * copied / max(held, 1))

    tokenizer = load_tokenizer(config.data.tokenizer_path)
    check_tokenizer(tokenizer, config.model, f"config.data.tokenizer_path={config.data.tokenizer_path}")
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    data_iter, budgets = pipeline.make_train_iterator(
        config.data, config.model, tokenizer, seed=config.seed, batch_size=config.batch_size,
        sharding=batch_sharding)
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
        state = ckpt.restore(start, checkpointing.abstract_with_shardings(abstract_state, state_shardings),
                             data_iter)
    else:
        start = 0
        params = (init_from.load_params(config.checkpoint, bundle, mesh, data_cfg=config.data)
                  if config.checkpoint.init_from else init_params())
        create = lambda p: state_lib.create(p, tx, jax.random.key(config.seed), config.ema.enabled)
        with jax.set_mesh(mesh):
            state = jax.jit(create, out_shardings=state_shardings, donate_argnums=0)(params)

    forward = model_setup.make_forward(bundle)
    step_fn = runtime.SyncedJit(jax.jit(
        make_train_step(forward, tx, schedule, config, step_frozen_fn(bundle.abstract_params, config.freeze)),
        in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, replicated),
        donate_argnums=0), "train_step")
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
    flops_per_step = step_flops(config, budgets[-1])
    window_t0, window_steps, window_tokens, window = time.perf_counter(), 0, 0.0, None
    guard, pending = _NonFiniteGuard(config.nan_guard.max_consecutive, ckpt), None
    samples = TrainingSamples(config, bundle, tokenizer, workdir, writer, mesh) if config.sample_every else None
    stopped = False
    try:
        with jax.set_mesh(mesh), activation_rules(rules):
            for step in range(start, config.total_steps):
                batch = next(data_iter)
                state, metrics = step_fn(state, batch)
                window_steps += 1
                window_tokens += metrics["real_tokens"]  # stays on device until logged
                averages = TrainMetrics.single_from_model_output(**{k: metrics[k] for k in AVERAGED})
                window = averages if window is None else window.merge(averages)
                done = step + 1
                # Check the previous step's guard while this one runs (no host sync per step).
                if pending:
                    guard.check(*pending)
                pending = (done, metrics)
                if done % config.log_every == 0 or done == config.total_steps:
                    guard.check(*pending)
                    pending = None
                    jax.block_until_ready(state)
                    elapsed = time.perf_counter() - window_t0
                    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    scalars.update({k: float(v) for k, v in window.compute().items()})  # window means
                    scalars.update(
                        step_time=elapsed / window_steps, tokens_per_s=float(window_tokens) / elapsed,
                        mfu=mfu_lib.mfu(flops_per_step, elapsed / window_steps, peak, peak_devices),
                        nonfinite_total=int(state.nonfinite_total), compilations=step_fn.num_compiled,
                        **data_iter.metrics())
                    writer.write(done, scalars)
                    progress.log(done, scalars)
                    last = scalars
                    window_t0, window_steps, window_tokens, window = time.perf_counter(), 0, 0.0, None
                if samples and done % config.sample_every == 0:
                    samples(done, state.ema or state.params)
                save_step = done % config.checkpoint_every == 0 or done == config.total_steps
                stopped = sigterm.stop(sync_point=save_step or done % config.log_every == 0)
                # A failed asynchronous save stops the run here (a flag read while one runs).
                ckpt.poll(sync_point=save_step or done % config.log_every == 0)
                if save_step or stopped:
                    if pending:  # never checkpoint past an unchecked step
                        guard.check(*pending)
                        pending = None
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
