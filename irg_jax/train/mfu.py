"""Model FLOPs utilisation: achieved FLOP/s over the devices' peak.

Peaks are dense bf16 figures from vendor data sheets, per device. On CPU there is no
data-sheet figure that means anything, so the peak is *measured* at start-up: a large
fp32 matmul under jit (about 200 GFLOP/s on the 2-core dev machine).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

# Substring of jax.Device.device_kind (lower case) -> peak FLOP/s per device.
PEAK_FLOPS = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("l4", 121e12),
    ("v6 lite", 918e12),
    ("v6e", 918e12),
    ("v5p", 459e12),
    ("v5 lite", 197e12),
    ("v5e", 197e12),
    ("v4", 275e12),
)


def measure_matmul_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """FLOP/s of an n×n fp32 matmul on the default device (median of ``repeats``)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / float(np.median(times))


def peak_flops_per_device(device: jax.Device | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where the figure came from) for one device."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    for key, peak in PEAK_FLOPS:
        if key in kind:
            return peak, f"data sheet ({device.device_kind})"
    if device.platform == "cpu":
        return measure_matmul_flops(), "measured fp32 matmul"
    raise ValueError(f"no peak FLOP/s known for device kind {device.device_kind!r}; add it to PEAK_FLOPS")


def mfu(flops_per_step: float, step_seconds: float, peak_per_device: float, num_devices: int) -> float:
    """Fraction of the aggregate peak achieved."""
    return flops_per_step / max(step_seconds, 1e-12) / (peak_per_device * num_devices)
