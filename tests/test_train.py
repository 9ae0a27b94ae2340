"""Training: determinism, exact resume after SIGKILL, SIGTERM save-and-exit, restore on another
mesh, the non-finite guard, freezing masks and that the losses fall on the synthetic world.

The process-level tests run ``python -m irg_jax.train`` exactly as a user does (one CPU
device, tiny config, a small synthetic world); they share the persistent compile cache.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from irg_jax.synthetic.world import generate
    out = tmp_path_factory.mktemp("world")
    generate(out, num=160, seed=0)
    return out


def _cmd(world, workdir, *overrides):
    return [sys.executable, "-m", "irg_jax.train",
            "--config", f"{REPO}/configs/irgl_stage1.py:tiny,data_root={world}", "--workdir", str(workdir),
            f"--config.total_steps={STEPS}", "--config.batch_size=2", "--config.checkpoint_every=2",
            "--config.log_every=1", "--config.checkpoint.keep=10", *overrides]


def _env():
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    return env


def _run(cmd, timeout=600):
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _losses(workdir) -> dict[int, tuple[float, float, float]]:
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["ce"], r["mse"]) for r in rows}


def _complete_steps(workdir) -> list[int]:
    ckpt = pathlib.Path(workdir) / "checkpoints"
    if not ckpt.exists():
        return []
    # Orbax commits a step by renaming its temporary folder to the bare step number.
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and (p / "state").exists())


def _start_and_wait_for_checkpoint(cmd, workdir, step, timeout=600):
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while step not in _complete_steps(workdir):
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited (rc {proc.returncode}) before checkpoint {step}:\n"
                                 + proc.stdout.read()[-4000:])
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"no checkpoint {step} after {timeout}s")
        time.sleep(0.05)
    return proc


@pytest.fixture(scope="module")
def reference_run(world, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    _run(_cmd(world, workdir, "--config.sample_every=3"))  # sampling must not change the losses
    return workdir


def test_run_writes_metrics_checkpoints_export_and_one_compilation(reference_run):
    losses = _losses(reference_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    rows = [json.loads(l) for l in (reference_run / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "ce", "mse", "lr", "grad_norm", "tokens_per_s", "step_time", "mfu"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[-1]["compilations"] == 1, "the train step recompiled"
    assert _complete_steps(reference_run)[-1] == STEPS
    assert (reference_run / "export" / "params").is_dir()
    assert (reference_run / "config.json").exists()
    assert list((reference_run / "tensorboard").iterdir()), "no TensorBoard events"
    from PIL import Image
    grids = sorted(p.name for p in (reference_run / "samples").iterdir())
    assert grids == ["step_0000003.png", "step_0000006.png"]
    with Image.open(reference_run / "samples" / grids[0]) as im:
        assert im.size[1] == 4 * (32 * 4 + 4)  # four prompts, 32-px images upscaled 4x


def test_same_seed_gives_identical_losses_and_sigkill_resume_is_exact(world, reference_run, tmp_path):
    """Determinism (steps before the kill) and exact resume (steps after it)."""
    proc = _start_and_wait_for_checkpoint(_cmd(world, tmp_path), tmp_path, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(_losses(tmp_path))
    _run(_cmd(world, tmp_path))
    ref, got = _losses(reference_run), _losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1)), f"steps after a kill at {killed_at}: {sorted(got)}"
    for step in range(1, STEPS + 1):
        assert got[step] == ref[step], f"step {step}: {got[step]} != {ref[step]} (killed after step {killed_at})"


# `python -m irg_jax.train` with a hook that sends SIGTERM to the trainer itself when step
# SIGTERM_AT has been logged: the signal always arrives mid-run at a known step.
SIGTERM_AT = 3
_SIGTERM_LAUNCHER = f"""
import os, runpy, signal
from irg_jax.train import metrics
log = metrics.ProgressLine.log
def log_then_signal(self, step, scalars):
    log(self, step, scalars)
    if step == {SIGTERM_AT}:
        os.kill(os.getpid(), signal.SIGTERM)
metrics.ProgressLine.log = log_then_signal
runpy.run_module("irg_jax.train", run_name="__main__", alter_sys=True)
"""


def test_sigterm_saves_exits_zero_and_restart_continues(world, reference_run, tmp_path):
    cmd = _cmd(world, tmp_path)
    assert cmd[1:3] == ["-m", "irg_jax.train"]
    proc = _run([sys.executable, "-c", _SIGTERM_LAUNCHER, *cmd[3:]])
    assert "SIGTERM received" in proc.stderr
    assert _complete_steps(tmp_path) == [2, SIGTERM_AT], "the SIGTERM save is not at the step it arrived"
    assert max(_losses(tmp_path)) == SIGTERM_AT
    assert not (tmp_path / "export").exists(), "a SIGTERM stop must not export"
    restart = _run(_cmd(world, tmp_path))
    assert f"resuming from step {SIGTERM_AT}" in restart.stderr
    ref, got = _losses(reference_run), _losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == ref[s] for s in range(1, STEPS + 1))


def test_losses_fall_on_the_synthetic_world(world, tmp_path):
    """20 steps of the tiny config at batch 4: CE and MSE clearly below their start."""
    _run(_cmd(world, tmp_path, "--config.total_steps=20", "--config.batch_size=4", "--config.checkpoint_every=20"))
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], np.mean([[r["ce"], r["mse"]] for r in rows[-3:]], axis=0)
    assert last[0] < 0.8 * first["ce"], (first["ce"], last[0])
    assert last[1] < 0.9 * first["mse"], (first["mse"], last[1])


# ---------------------------------------------------------------- in-process (8 simulated devices)

def _tiny_config(world, **mesh):
    from irg_jax.config import validate
    from irg_jax.config.irgl import irgl_config
    c = irgl_config(1, f"tiny,data_root={world}")
    c.mesh.update(mesh)
    c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 8, 1, 1, 1
    validate(c)
    return c


def test_restore_on_a_different_mesh(world, tmp_path):
    """Save on an 8x1 (fsdp) mesh, resume on a 2x4 (fsdp x tensor) mesh: same values, new shardings."""
    from irg_jax.train import loop

    first = _tiny_config(world, data=1, fsdp=8, tensor=1)
    loop.train(first, str(tmp_path))
    second = _tiny_config(world, data=1, fsdp=2, tensor=4)
    second.total_steps = 2
    scalars = loop.train(second, str(tmp_path))
    assert np.isfinite(scalars["loss"])
    assert sorted(_losses(tmp_path)) == [1, 2]

    # Checkpoint 1 (written on 8x1) restores on both meshes with identical values.
    a = _restore_params(first, tmp_path, 1)
    b = _restore_params(second, tmp_path, 1)
    leaf_a, leaf_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert any(x.sharding.spec != y.sharding.spec for x, y in zip(leaf_a, leaf_b))
    for x, y in zip(leaf_a, leaf_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _restore_params(config, workdir, step):
    from irg_jax.parallel.mesh import build_mesh
    from irg_jax.train import checkpointing
    from irg_jax.train.setup import train_setup
    setup = train_setup(config, build_mesh(config.mesh))
    ckpt = checkpointing.Checkpointer(workdir, config)
    try:
        state = ckpt.restore(step, setup.abstract_state, None)
    finally:
        ckpt.close()
    return state.params


def test_nonfinite_guard_skips_updates_and_stops(world, tmp_path):
    """A huge learning rate: the first update overflows the params while loss and gradient are
    finite. The guard skips it, the stop names the step, and the checkpoint it names as the last
    good state has finite parameters."""
    from irg_jax.train import loop
    c = _tiny_config(world, data=1, fsdp=8, tensor=1)
    c.total_steps, c.checkpoint_every = 6, 1
    c.optim.lr, c.optim.weight_decay, c.optim.clip_norm, c.optim.warmup_steps = 3e38, 1.0, 0.0, 0
    c.nan_guard.max_consecutive = 2
    with pytest.raises(loop.NonFiniteError, match="2 consecutive non-finite steps at step 2") as err:
        loop.train(c, str(tmp_path))
    assert "steps 1-2 skipped" in str(err.value) and "latest checkpoint, step 1 in" in str(err.value)
    assert _complete_steps(tmp_path) == [1]
    params = _restore_params(c, tmp_path, 1)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params)), "the 'last good' checkpoint is not finite"


def test_failed_async_save_stops_the_run_at_once_and_keeps_the_previous_checkpoint(world, tmp_path, monkeypatch):
    """The second asynchronous save (step 8) fails in Orbax's background thread with "No space left
    on device": the run stops with that error before its next save (step 12; without the poll the
    error would surface there), the partial folder is gone and checkpoint 4 still restores."""
    import errno
    import threading
    from orbax.checkpoint._src.checkpointers import async_checkpointer
    from irg_jax.train import checkpointing, loop, metrics

    real_commit, calls, failed = async_checkpointer._background_wait_for_commit_futures, [], threading.Event()

    def commit(directory, commit_futures, *args, **kwargs):  # runs in Orbax's background save thread
        calls.append(directory)
        if len(calls) == 2:
            for f in commit_futures:  # the writes end, then the commit fails
                f.result()
            failed.set()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_commit(directory, commit_futures, *args, **kwargs)

    real_log = metrics.ProgressLine.log

    def log(self, step, scalars):  # hold step 9 until the save has failed
        if step == 9:
            assert failed.wait(120), "the save at step 8 never ran"
        return real_log(self, step, scalars)

    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", commit)
    monkeypatch.setattr(metrics.ProgressLine, "log", log)
    c = _tiny_config(world, data=1, fsdp=8, tensor=1)
    c.total_steps, c.checkpoint_every, c.checkpoint.keep, c.checkpoint.async_save = 16, 4, 1, True
    with pytest.raises(checkpointing.CheckpointSaveError) as err:
        loop.train(c, str(tmp_path))
    message = str(err.value)
    assert "checkpoint save at step 8 failed" in message and "No space left on device" in message, message
    assert "step 4 in" in message and "intact" in message, message
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert max(_losses(tmp_path)) < 12, f"the run went on to step {max(_losses(tmp_path))} after the failed save"
    assert _complete_steps(tmp_path) == [4]  # keep=1: step 4 would have been removed had 8 committed
    assert not list((tmp_path / "checkpoints").glob("8.*")), "the failed save's partial folder is left"
    monkeypatch.undo()
    params = _restore_params(c, tmp_path, 4)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))


def test_resume_refuses_changed_config_and_keeps_allowed_changes_beside(world, tmp_path):
    """Resume with another batch size: refused, naming batch_size, config.json untouched. A run
    whose data fails to load does not touch config.json. Resume with a longer run (an allowed
    key): proceeds and keeps both config files."""
    from irg_jax.config.resume import ResumeConfigError
    from irg_jax.train import loop
    first = _tiny_config(world, data=1, fsdp=8, tensor=1)
    loop.train(first, str(tmp_path))
    original = (tmp_path / "config.json").read_bytes()
    assert json.loads(original)["total_steps"] == 1

    changed = _tiny_config(world, data=1, fsdp=8, tensor=1)
    changed.batch_size, changed.total_steps = 16, 2
    with pytest.raises(ResumeConfigError, match=r"config\.batch_size: 8 -> 16") as err:
        loop.train(changed, str(tmp_path))
    assert err.value.keys == ["batch_size"]  # total_steps may change

    bad_data = _tiny_config(world, data=1, fsdp=8, tensor=1)
    bad_data.total_steps = 2
    group = sorted(bad_data.data.groups.keys())[0]
    bad_data.data.groups[group].paths = (str(tmp_path / "no_such_data"),)
    with pytest.raises(FileNotFoundError, match="no_such_data"):
        loop.train(bad_data, str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("config*.json")) == ["config.json"]
    assert (tmp_path / "config.json").read_bytes() == original

    longer = _tiny_config(world, data=1, fsdp=8, tensor=1)
    longer.total_steps, longer.log_every = 2, 2
    loop.train(longer, str(tmp_path))
    assert sorted(_losses(tmp_path)) == [1, 2]
    assert (tmp_path / "config.json").read_bytes() == original
    assert sorted(p.name for p in tmp_path.glob("config*.json")) == ["config.json", "config.step1.json"]
    assert json.loads((tmp_path / "config.step1.json").read_text())["total_steps"] == 2


def test_record_never_overwrites_and_skips_an_unchanged_config(tmp_path):
    from irg_jax.config.resume import changes, record
    from irg_jax.config.schema import base_config
    c = base_config()
    assert record(c, tmp_path, 0).name == "config.json"
    assert record(c, tmp_path, 5) is None  # same as the newest file
    c.total_steps = 7
    assert record(c, tmp_path, 5).name == "config.step5.json"
    c.total_steps = 9
    assert record(c, tmp_path, 5).name == "config.step5.1.json"
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 1000
    old, new = base_config().to_dict(), base_config()
    new.optim.lr, new.log_every = 1.0, 3
    refused, allowed, schema = changes(old, new.to_dict())
    assert [k for k, _, _ in refused] == ["optim.lr"] and [k for k, _, _ in allowed] == ["log_every"] and not schema


def _toy_step(config, params):
    """The real train step on a linear toy forward (shapes as Bagel's outputs)."""
    from irg_jax.train import state as state_lib
    from irg_jax.train.optimizer import make_optimizer, step_frozen_fn
    from irg_jax.train.step import make_train_step

    def forward(p, batch, key):
        h = batch["x"] @ p["decoder"]["w"]
        return {"ce_logits": h, "velocity": batch["x"] @ p["vit"]["w"], "target": batch["y"]}

    tx, schedule = make_optimizer(config, params)
    state = state_lib.create(params, tx, jax.random.key(0), config.ema.enabled)
    step = jax.jit(make_train_step(forward, tx, schedule, config, step_frozen_fn(params, config.freeze)))
    return state, step


def _toy_batch(scale=1.0):
    x = jnp.ones((4, 3)) * scale
    return {"x": x, "y": jnp.zeros((4, 3)), "ce_labels": jnp.array([0, 1, 2, 0]),
            "ce_valid": jnp.array([True, True, True, False]), "latent_noisy": jnp.ones((4,), bool),
            "kind": jnp.ones((4,), jnp.int32)}


def test_nonfinite_step_leaves_the_state_untouched():
    from irg_jax.config.schema import base_config
    c = base_config()
    c.optim.lr = 1e-2
    params = {"decoder": {"w": jnp.ones((3, 3))}, "vit": {"w": jnp.ones((3, 3))}}
    state, step = _toy_step(c, params)
    good, m = step(state, _toy_batch())
    assert bool(m["finite"]) and int(good.step) == 1
    bad, m = step(good, _toy_batch(jnp.nan))
    assert not bool(m["finite"])
    assert int(bad.step) == 1 and int(bad.nonfinite_streak) == 1 and int(bad.nonfinite_total) == 1
    for a, b in zip(jax.tree.leaves((good.params, good.ema, good.opt_state)),
                    jax.tree.leaves((bad.params, bad.ema, bad.opt_state))):
        np.testing.assert_array_equal(a, b)
    again, _ = step(bad, _toy_batch())
    assert int(again.nonfinite_streak) == 0 and int(again.nonfinite_total) == 1


def test_nonfinite_update_with_finite_loss_and_gradient_is_skipped():
    """A huge learning rate: loss and gradient are finite, the update overflows the params to
    -inf. The guard must see it and keep the old state (nothing non-finite is ever kept)."""
    from irg_jax.config.schema import base_config
    c = base_config()
    c.optim.lr, c.optim.weight_decay = 3e38, 1.0  # -lr * (m/sqrt(v) + wd * p) = -6e38 for p = 1
    params = {"decoder": {"w": jnp.ones((3, 3))}, "vit": {"w": jnp.ones((3, 3))}}
    state, step = _toy_step(c, params)
    new, m = step(state, _toy_batch())
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert not bool(m["finite"])
    assert int(new.step) == 0 and int(new.nonfinite_streak) == 1 and int(new.nonfinite_total) == 1
    for a, b in zip(jax.tree.leaves((state.params, state.ema, state.opt_state)),
                    jax.tree.leaves((new.params, new.ema, new.opt_state))):
        np.testing.assert_array_equal(a, b)


def test_injected_nan_update_is_skipped():
    """An optimiser that returns NaN updates (loss and gradient finite): the step is skipped."""
    import optax
    from irg_jax.config.schema import base_config
    from irg_jax.train import state as state_lib
    from irg_jax.train.step import make_train_step
    c = base_config()
    params = {"decoder": {"w": jnp.ones((3, 3))}, "vit": {"w": jnp.ones((3, 3))}}
    nan_tx = optax.GradientTransformation(
        lambda p: optax.EmptyState(), lambda g, s, p=None: (jax.tree.map(lambda x: x * jnp.nan, g), s))
    forward = lambda p, b, k: {"ce_logits": b["x"] @ p["decoder"]["w"], "velocity": b["x"] @ p["vit"]["w"],
                               "target": b["y"]}
    no_freeze = lambda step: jax.tree.map(lambda _: jnp.zeros((), bool), params)
    step = jax.jit(make_train_step(forward, nan_tx, optax.constant_schedule(1.0), c, no_freeze))
    state = state_lib.create(params, nan_tx, jax.random.key(0), True)
    new, m = step(state, _toy_batch())
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"])) and not bool(m["finite"])
    np.testing.assert_array_equal(new.params["decoder"]["w"], params["decoder"]["w"])
    np.testing.assert_array_equal(new.ema["vit"]["w"], params["vit"]["w"])


def test_static_freezing_keeps_no_optimizer_state_and_no_update():
    from irg_jax.config.schema import base_config
    c = base_config()
    c.freeze.vit = True
    params = {"decoder": {"w": jnp.ones((3, 3))}, "vit": {"w": jnp.ones((3, 3))}}
    state, step = _toy_step(c, params)
    adam_leaves = [l for l in jax.tree.leaves(state.opt_state) if getattr(l, "shape", ()) == (3, 3)]
    assert len(adam_leaves) == 2, "frozen vit/w must have no Adam moments (only decoder/w's mu, nu)"
    new, _ = step(state, _toy_batch())
    np.testing.assert_array_equal(new.params["vit"]["w"], params["vit"]["w"])
    assert not np.array_equal(new.params["decoder"]["w"], params["decoder"]["w"])


def test_step_triggered_freezing():
    from irg_jax.config.schema import base_config
    c = base_config()
    c.optim.lr = 1e-2
    c.freeze.llm_step = 1  # IRG-style: the LLM stops updating from step 1 on
    params = {"decoder": {"w": jnp.ones((3, 3))}, "vit": {"w": jnp.ones((3, 3))}}
    state, step = _toy_step(c, params)
    s1, _ = step(state, _toy_batch())
    s2, _ = step(s1, _toy_batch())
    assert not np.array_equal(s1.params["decoder"]["w"], params["decoder"]["w"])
    np.testing.assert_array_equal(s2.params["decoder"]["w"], s1.params["decoder"]["w"])
    assert not np.array_equal(s2.params["vit"]["w"], s1.params["vit"]["w"])


def test_parameter_groups_match_the_real_model():
    """Every freezing group selects a non-empty, correct part of Bagel's parameter tree."""
    from irg_jax.config.irgl import irgl_config
    from irg_jax.model.bagel import Bagel
    from irg_jax.train.optimizer import group_mask, path_str
    from flax import nnx

    cfg = irgl_config(1, "tiny").model
    abstract = nnx.eval_shape(lambda: Bagel(cfg, rngs=nnx.Rngs(0)))
    params = nnx.split(abstract, nnx.Param, ...)[1].to_pure_dict()
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for group in ("llm", "vit", "und_expert", "gen_expert", "image_io"):
        chosen = [p for p, m in zip(paths, jax.tree.leaves(group_mask(params, group))) if m]
        assert chosen, f"group {group} selects nothing; paths look like {paths[:5]}"
    und = [p for p, m in zip(paths, jax.tree.leaves(group_mask(params, "und_expert"))) if m]
    gen = [p for p, m in zip(paths, jax.tree.leaves(group_mask(params, "gen_expert"))) if m]
    assert not set(und) & set(gen)
    assert any("q_proj" in p for p in und) and any("q_proj" in p for p in gen)


def test_ema_follows_the_params():
    from irg_jax.config.schema import base_config
    c = base_config()
    c.optim.lr, c.ema.decay = 1e-1, 0.5
    params = {"decoder": {"w": jnp.ones((3, 3))}, "vit": {"w": jnp.ones((3, 3))}}
    state, step = _toy_step(c, params)
    new, _ = step(state, _toy_batch())
    want = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, state.ema, new.params)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(new.ema)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_ema_warmup_starts_near_the_params_and_ends_at_the_decay():
    from irg_jax.config.schema import base_config
    from irg_jax.train.step import ema_decay_at
    assert float(ema_decay_at(jnp.int32(0), 0.99, False)) == pytest.approx(0.99)
    assert float(ema_decay_at(jnp.int32(0), 0.99, True)) == pytest.approx(0.1)
    assert float(ema_decay_at(jnp.int32(90), 0.99, True)) == pytest.approx(0.91)
    assert float(ema_decay_at(jnp.int32(5000), 0.99, True)) == pytest.approx(0.99)
    c = base_config()
    c.optim.lr, c.ema.decay, c.ema.warmup = 1e-1, 0.99, True
    params = {"decoder": {"w": jnp.ones((3, 3))}, "vit": {"w": jnp.ones((3, 3))}}
    state, step = _toy_step(c, params)
    new, _ = step(state, _toy_batch())
    want = jax.tree.map(lambda e, p: 0.1 * e + 0.9 * p, state.ema, new.params)  # decay 1/10 at step 0
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(new.ema)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
