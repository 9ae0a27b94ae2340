"""irg_jax: IRG (Interleaving Reasoning Generation) on a BAGEL-architecture model, in JAX."""

__version__ = "0.1.0"
