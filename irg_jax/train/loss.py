"""IRG's losses: next-token CE and flow-matching MSE, each a mean over the global batch.

Both are normalised by their token count over the **global** batch: the sums run over
every pack of the step (all devices, all micro-batches) and are divided by the count of
CE (MSE) tokens in the whole step, as the official code does with an all-reduce.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def ce_sum(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
    """Sum of token cross-entropies over valid positions (logits in fp32)."""
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.sum(jnp.where(valid, per_token, 0.0))


def mse_sum(velocity: jax.Array, target: jax.Array, noisy: jax.Array) -> jax.Array:
    """Sum over noisy latent tokens of the per-token mean squared error over channels."""
    per_token = jnp.mean(jnp.square(velocity.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
    return jnp.sum(jnp.where(noisy, per_token, 0.0))


def token_counts(batch: dict) -> tuple[jax.Array, jax.Array]:
    """(number of CE tokens, number of MSE tokens) in a (global) batch."""
    return jnp.sum(batch["ce_valid"]), jnp.sum(batch["latent_noisy"])
