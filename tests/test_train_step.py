"""The train step's arithmetic on a toy forward, and every shipped config variant validates.

- gradient accumulation: k micro-batches give the gradient of the one big batch (fp32);
- the learning-rate schedule: warmup and decay values at chosen steps;
- the loss-disable steps: text (CE) / image (MSE) loss off from the configured step on.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from irg_jax.config import load_config_file, validate
from irg_jax.config.irgl import VARIANTS
from irg_jax.config.schema import base_config
from irg_jax.train import state as state_lib
from irg_jax.train.optimizer import learning_rate_schedule, step_frozen_fn
from irg_jax.train.step import make_train_step

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROWS = 8


def _params():
    keys = jax.random.split(jax.random.key(0), 2)
    return {"decoder": {"w": jax.random.normal(keys[0], (3, 5))}, "vit": {"w": jax.random.normal(keys[1], (3, 4))}}


def _forward(p, batch, key):
    """Bagel's outputs from linear maps: CE logits, velocity, target (rows are tokens)."""
    return {"ce_logits": batch["x"] @ p["decoder"]["w"], "velocity": batch["x"] @ p["vit"]["w"], "target": batch["y"]}


def _batch():
    rng = np.random.default_rng(1)
    return {"x": jnp.asarray(rng.normal(size=(ROWS, 3)), jnp.float32),
            "y": jnp.asarray(rng.normal(size=(ROWS, 4)), jnp.float32),
            "ce_labels": jnp.asarray(rng.integers(0, 5, ROWS), jnp.int32),
            # uneven valid/noisy counts per micro-batch: the losses are normalised over the whole step
            "ce_valid": jnp.asarray([1, 1, 1, 0, 1, 0, 0, 1], bool),
            "latent_noisy": jnp.asarray([1, 0, 1, 1, 1, 1, 0, 1], bool),
            "kind": jnp.ones((ROWS,), jnp.int32)}


def _step(config, tx=None):
    """(initial state, jitted step); ``tx`` default: plain SGD at lr 1 (new params = params - grads)."""
    params = _params()
    tx = tx or optax.sgd(1.0)
    schedule = learning_rate_schedule(config.optim, config.total_steps)
    state = state_lib.create(params, tx, jax.random.key(0), False)
    return state, jax.jit(make_train_step(_forward, tx, schedule, config, step_frozen_fn(params, config.freeze)))


@pytest.mark.parametrize("k", [2, 4])
def test_gradient_accumulation_equals_one_big_batch(k):
    one = base_config()
    many = base_config()
    many.optim.grad_accum_steps = k
    state, step_one = _step(one)
    _, step_many = _step(many)
    a, ma = step_one(state, _batch())
    b, mb = step_many(state, _batch())
    for key in ("loss", "ce", "mse", "grad_norm"):
        np.testing.assert_allclose(float(mb[key]), float(ma[key]), rtol=1e-6, err_msg=key)
    assert float(ma["grad_norm"]) > 0 and bool(ma["finite"]) and bool(mb["finite"])
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):  # params - gradient
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)


def test_learning_rate_schedule_values():
    c = base_config()
    c.optim.lr, c.optim.min_lr, c.optim.warmup_steps = 1e-3, 1e-5, 10
    constant = learning_rate_schedule(c.optim, total_steps=100)
    for step, want in ((0, 0.0), (5, 5e-4), (10, 1e-3), (99, 1e-3)):
        assert float(constant(step)) == pytest.approx(want, rel=1e-6, abs=1e-12), step
    c.optim.schedule = "cosine"
    cosine = learning_rate_schedule(c.optim, total_steps=110)  # warmup 10, then 100 steps of decay
    for step, want in ((0, 0.0), (5, 5e-4), (10, 1e-3), (60, (1e-3 + 1e-5) / 2), (110, 1e-5)):
        assert float(cosine(step)) == pytest.approx(want, rel=1e-5, abs=1e-12), step
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    assert float(learning_rate_schedule(c.optim, 100)(0)) == pytest.approx(1e-3)
    # the step reports the rate it applies
    c.optim.warmup_steps = 10
    state, step = _step(c)
    _, m = step(state, _batch())
    assert float(m["lr"]) == 0.0


@pytest.mark.parametrize("which", ["text", "image"])
def test_loss_disable_step(which):
    """With ``<which>_loss_disable_step = 1``: step 0 trains on both losses, step 1 on the other one only."""
    c = base_config()
    c.loss.ce_weight, c.loss.mse_weight = 0.5, 2.0
    setattr(c.loss, f"{which}_loss_disable_step", 1)
    state, step = _step(c)
    s1, m0 = step(state, _batch())
    _, m1 = step(s1, _batch())
    assert int(s1.step) == 1
    assert float(m0["loss"]) == pytest.approx(0.5 * float(m0["ce"]) + 2.0 * float(m0["mse"]), rel=1e-6)
    kept = 2.0 * float(m1["mse"]) if which == "text" else 0.5 * float(m1["ce"])
    assert float(m1["ce"]) > 0 and float(m1["mse"]) > 0  # both still measured
    assert float(m1["loss"]) == pytest.approx(kept, rel=1e-6)
    # the disabled loss sends no gradient: its parameters stay put at step 1 under plain SGD
    off = "decoder" if which == "text" else "vit"
    s2, _ = step(s1, _batch())
    np.testing.assert_array_equal(np.asarray(s2.params[off]["w"]), np.asarray(s1.params[off]["w"]))


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_config_variant_validates(stage, variant, tmp_path):
    config = load_config_file(f"{ROOT}/configs/irgl_stage{stage}.py:{variant},data_root={tmp_path}")
    # The demo runs on one device; the others on the 8 the tests simulate.
    validate(config, num_devices=1 if variant == "demo" else 8)
    assert config.model.llm.num_layers > 0 and config.total_steps > 0
