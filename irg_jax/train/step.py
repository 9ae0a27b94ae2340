"""The jitted train step: loss, gradients (with accumulation), guarded update, EMA.

The guard skips the whole update (params, EMA, optimiser state) when the loss, the gradient
norm or any new parameter is not finite, and counts the skipped steps in the state."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from irg_jax.train import loss as loss_lib
from irg_jax.train.state import TrainState

# forward(params, batch, rng) -> {"ce_sum" (or "ce_logits"), "velocity", "target"}
ForwardFn = Callable[[Any, dict, jax.Array], dict]


def _micro_batches(batch: dict, k: int) -> dict:
    return jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """EMA decay of the update after ``step`` finished steps: ``decay``, or with ``warmup``
    min(decay, (1 + step) / (10 + step)), so that a run from scratch does not keep its
    random initialisation in the average (0.99^400 = 2% of it after 400 steps)."""
    if not warmup:
        return jnp.float32(decay)
    n = step.astype(jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def make_train_step(forward: ForwardFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    config: ml_collections.ConfigDict,
                    step_frozen: Callable[[jax.Array], Any]) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Build ``train_step(state, batch) -> (state, metrics)`` (jit it with shardings)."""
    accum = config.optim.grad_accum_steps
    w_ce, w_mse = config.loss.ce_weight, config.loss.mse_weight
    text_off_at, image_off_at = config.loss.text_loss_disable_step, config.loss.image_loss_disable_step
    ema_decay, ema_warmup = config.ema.decay, config.ema.warmup

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        n_ce, n_mse = loss_lib.token_counts(batch)  # global counts over the whole step
        n_ce_safe, n_mse_safe = jnp.maximum(n_ce, 1), jnp.maximum(n_mse, 1)
        text_on = (text_off_at < 0) | (state.step < text_off_at)
        image_on = (image_off_at < 0) | (state.step < image_off_at)

        def micro_loss(params, micro, key):
            out = forward(params, micro, key)
            ce_total = (out["ce_sum"] if "ce_sum" in out
                        else loss_lib.ce_sum(out["ce_logits"], micro["ce_labels"], micro["ce_valid"]))
            ce = ce_total / n_ce_safe
            mse = loss_lib.mse_sum(out["velocity"], out["target"], micro["latent_noisy"]) / n_mse_safe
            total = jnp.where(text_on, w_ce * ce, 0.0) + jnp.where(image_on, w_mse * mse, 0.0)
            return total, (ce, mse)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        if accum == 1:
            (loss, (ce, mse)), grads = grad_fn(state.params, batch, step_key)
        else:
            def body(carry, xs):
                micro, i = xs
                (l, (c, m)), g = grad_fn(state.params, micro, jax.random.fold_in(step_key, i))
                acc_g, acc_l, acc_c, acc_m = carry
                return (jax.tree.map(jnp.add, acc_g, g), acc_l + l, acc_c + c, acc_m + m), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, loss, ce, mse), _ = jax.lax.scan(
                body, (zeros, 0.0, 0.0, 0.0), (_micro_batches(batch, accum), jnp.arange(accum)))

        frozen = step_frozen(state.step)
        grads = jax.tree.map(lambda g, f: jnp.where(f, jnp.zeros_like(g), g), grads, frozen)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def updated(params, opt_state, ema):
            """The optimiser update and the EMA: (new params, new optimiser state, new EMA)."""
            updates, new_opt = tx.update(grads, opt_state, params)
            updates = jax.tree.map(lambda u, f: jnp.where(f, jnp.zeros_like(u), u), updates, frozen)
            new_params = optax.apply_updates(params, updates)
            if ema:
                decay = ema_decay_at(state.step, ema_decay, ema_warmup)
                ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, new_params)
            return new_params, new_opt, ema

        # A finite loss and gradient can still give a non-finite update (e.g. a huge learning
        # rate): the new parameters are checked before anything is applied. The check is a
        # reduction over the update computed on the fly (nothing of the state's size is kept);
        # the update itself then runs inside a cond, so the old state is read and overwritten
        # in one place. (Selecting between full new and old trees instead kept both alive:
        # 1.5 GiB more per device in the 7B plan at 8 devices.)
        probe = updated(state.params, state.opt_state, state.ema)[0]
        finite = finite & jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(probe)]))
        new_params, new_opt, new_ema = jax.lax.cond(finite, updated, lambda *old: old,
                                                    state.params, state.opt_state, state.ema)
        new_state = state.replace(
            step=state.step + jnp.where(finite, 1, 0).astype(jnp.int32),
            params=new_params,
            ema=new_ema,
            opt_state=new_opt,
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
            nonfinite_total=state.nonfinite_total + jnp.where(finite, 0, 1),
        )
        metrics = {
            "loss": loss, "ce": ce, "mse": mse, "grad_norm": grad_norm,
            "lr": schedule(state.step), "ce_tokens": n_ce, "mse_tokens": n_mse,
            "finite": finite, "nonfinite_streak": new_state.nonfinite_streak,
            "real_tokens": jnp.sum(batch["kind"] != 0),
        }
        return new_state, metrics

    return train_step
