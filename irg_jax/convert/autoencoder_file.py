"""The frozen autoencoder of a params checkpoint directory.

BAGEL keeps the FLUX autoencoder outside the model's state dict; a converted checkpoint
keeps it the same way: ``DIR/ae.safetensors`` with FLUX key names (copied as-is) and its
sizes in ``DIR/model_config.json`` under ``autoencoder``.
"""
from __future__ import annotations

import pathlib

from flax import nnx

from irg_jax.convert import ae_keys
from irg_jax.model.autoencoder import build_autoencoder

AE_FILE = "ae.safetensors"


def load_autoencoder_for(directory, model_cfg) -> nnx.Module:
    """The autoencoder for a checkpoint directory written by ``irg_jax.convert`` (or an export).

    ``kind == 'flux'``: built from ``DIR/ae.safetensors`` (FileNotFoundError naming the
    file if it is absent); ``kind == 'identity'``: parameter-free, nothing is read.
    """
    ae_cfg = model_cfg.autoencoder
    if ae_cfg.kind != "flux":
        return build_autoencoder(ae_cfg, rngs=nnx.Rngs(0))
    path = pathlib.Path(directory) / AE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the FLUX autoencoder weights are missing; copy BAGEL's "
                                f"{AE_FILE} (FLUX key names) into {pathlib.Path(directory)}")
    return ae_keys.load_autoencoder(path, ae_cfg)
