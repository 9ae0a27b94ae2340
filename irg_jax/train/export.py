"""The inference export of a training run: ``WORKDIR/export``, a params directory
(``irg_jax.convert.params_dir``: layout, readers and writers) holding the EMA (or the params)
in the model's compute dtype, the tokenizer's files and the frozen autoencoder.

Multi-process: :func:`export_for_inference` must be called by every process (Orbax writes the
parameter shards collectively); the small files are written by process 0 only.
"""
from __future__ import annotations

import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from irg_jax import runtime
from irg_jax.convert.params_dir import save_params


def export_for_inference(state, bundle, config: ml_collections.ConfigDict, workdir: str,
                         ae_source: pathlib.Path | None = None) -> pathlib.Path:
    """Write the EMA (or the raw params without EMA) in the model's compute dtype to WORKDIR/export.

    Every process calls it (see the module docstring)."""
    source = "ema" if state.ema else "params"
    dtype = jnp.dtype(config.model.dtype)
    params = jax.tree.map(lambda x: x.astype(dtype), state.ema if state.ema else state.params)
    out = save_params(pathlib.Path(workdir) / "export", params, config.model,
                      {"source": source, "step": int(state.step), "dtype": str(dtype)},
                      tokenizer_dir=config.data.get("tokenizer_path") or None)
    if ae_source is not None and runtime.is_primary():  # the frozen FLUX autoencoder travels with the export
        shutil.copy(ae_source, out / pathlib.Path(ae_source).name)
    logging.info("exported %s params (%s) to %s", source, dtype, out)
    return out
