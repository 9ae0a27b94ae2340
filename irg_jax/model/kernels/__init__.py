"""Pallas kernels for the packed attention of ``irg_jax.model.attention``.

* ``block_lists``: per (query block, key block) "any allowed pair" from the token metadata,
  turned into per-block visiting lists (scalar-prefetched on TPU, loop bounds on GPU).
* ``pallas_tpu``: Mosaic TPU kernels (forward, dQ, dK/dV) with ``PrefetchScalarGridSpec``.
* ``pallas_gpu``: Triton GPU kernels with the same contract.
* ``kernel_vjp``: the custom VJP both use (kernel forward + kernel backward).

Both run in Pallas interpret mode when asked (``interpret=True``) or when the default backend
is not the one they target (so every impl stays selectable on CPU, slowly); tests use that.
"""
