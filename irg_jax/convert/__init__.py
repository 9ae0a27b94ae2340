"""Convert between BAGEL / IRG PyTorch checkpoints and irg_jax params checkpoints.

  python -m irg_jax.convert bagel-to-orbax SRC_DIR DST_DIR [--dtype float32|bfloat16] [--scan-layers]
  python -m irg_jax.convert orbax-to-bagel CKPT_DIR DST_DIR [--dtype float32|bfloat16] [--max-shard-mib MIB]

The key mapping is :mod:`irg_jax.convert.bagel_keys`; :mod:`.plan` lays it out per tensor and
validates a source before any data is read; :mod:`.to_orbax` and :mod:`.to_bagel` stream
one tensor at a time (:mod:`.safetensors_stream`; sharded files with an index json:
:mod:`.shards`). Bad input raises :class:`ConvertError` (the CLI prints it, exit status 2).
The FLUX autoencoder stays a separate ``ae.safetensors`` in every checkpoint directory
(:func:`load_autoencoder_for`).
"""
from irg_jax.convert.autoencoder_file import AE_FILE, load_autoencoder_for
from irg_jax.convert.errors import ConvertError
from irg_jax.convert.plan import CheckpointMismatch
from irg_jax.convert.to_bagel import orbax_to_bagel
from irg_jax.convert.to_orbax import bagel_to_orbax

__all__ = ["AE_FILE", "CheckpointMismatch", "ConvertError", "bagel_to_orbax", "load_autoencoder_for",
           "orbax_to_bagel"]
