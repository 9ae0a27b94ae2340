"""FLUX ``ae.safetensors`` -> :class:`FluxAutoEncoder`, and ``ae_config.json`` -> config.

Our parameter paths mirror the FLUX key names, so the mapping is by rule:
  <path>/kernel  <- <key>.weight  conv (out, in, kh, kw) transposed to (kh, kw, in, out)
  <path>/scale   <- <key>.weight  GroupNorm weight
  <path>/bias    <- <key>.bias
with ``/`` -> ``.``. Every source key must be used exactly once and every parameter
filled; otherwise a ValueError lists the offending keys.
"""
from __future__ import annotations

import json
import pathlib
from typing import Mapping

import ml_collections
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from irg_jax.model.autoencoder import FluxAutoEncoder
from irg_jax.convert.param_loading import build_from_arrays, check_all_used, param_paths

_LEAF_TO_SOURCE = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def flux_source_key(path: str) -> str:
    """Our parameter path (``encoder/down/0/block/0/conv1/kernel``) -> FLUX key."""
    *head, leaf = path.split("/")
    if leaf not in _LEAF_TO_SOURCE:
        raise ValueError(f"autoencoder parameter {path!r} has no FLUX counterpart rule")
    return ".".join(head + [_LEAF_TO_SOURCE[leaf]])


def convert_flux_tensor(path: str, key: str, arr: np.ndarray) -> np.ndarray:
    """Layout change for one tensor: conv weights (out, in, kh, kw) -> (kh, kw, in, out)."""
    arr = np.asarray(arr, np.float32)
    if path.endswith("/kernel"):
        if arr.ndim != 4:
            raise ValueError(f"{key}: expected a 4-D conv weight (out, in, kh, kw), got shape {arr.shape}")
        return arr.transpose(2, 3, 1, 0)
    return arr


def flux_values(tensors: Mapping[str, np.ndarray], ae_cfg, origin: str = "ae.safetensors"):
    """{our path: (FLUX key, converted array)} for every parameter whose key exists; checks unused keys."""
    used: set[str] = set()
    values = {}
    for path in param_paths(lambda: FluxAutoEncoder(ae_cfg, nnx.Rngs(0))):
        key = flux_source_key(path)
        if key in tensors:
            used.add(key)
            values[path] = (key, convert_flux_tensor(path, key, tensors[key]))
    check_all_used(tensors, used, ("",), origin)
    return values


def load_autoencoder(path, ae_cfg) -> FluxAutoEncoder:
    """Build the FLUX AE of ``ae_cfg`` (kind 'flux') from a FLUX-layout ``ae.safetensors``."""
    if ae_cfg.kind != "flux":
        raise ValueError(f"load_autoencoder needs ae_cfg.kind == 'flux', got {ae_cfg.kind!r}")
    return autoencoder_from_tensors(load_file(str(path)), ae_cfg, origin=str(path))


def autoencoder_from_tensors(tensors: Mapping[str, np.ndarray], ae_cfg,
                             origin: str = "ae.safetensors") -> FluxAutoEncoder:
    """Build the FLUX AE from an in-memory FLUX state dict (see :func:`load_autoencoder`)."""
    values = flux_values(tensors, ae_cfg, origin)
    dtype = ae_cfg.get("dtype", "float32")
    return build_from_arrays(lambda: FluxAutoEncoder(ae_cfg, nnx.Rngs(0), dtype=dtype), values, origin)


def ae_config_from_json(path) -> ml_collections.ConfigDict:
    """``model.autoencoder`` ConfigDict (kind 'flux') from FLUX ``AutoEncoderParams`` json."""
    path = pathlib.Path(path)
    raw = json.loads(path.read_text())
    fields = ("downsample", "z_channels", "scale_factor", "shift_factor", "ch", "ch_mult", "num_res_blocks",
              "in_channels", "out_ch")
    missing = [f for f in fields if f not in raw]
    if missing:
        raise ValueError(f"{path}: missing autoencoder fields {missing}")
    cfg = ml_collections.ConfigDict({"kind": "flux", **{f: raw[f] for f in fields}})
    cfg.ch_mult = tuple(raw["ch_mult"])
    if 2 ** (len(cfg.ch_mult) - 1) != cfg.downsample:
        raise ValueError(f"{path}: ch_mult {raw['ch_mult']} implies downsample {2 ** (len(cfg.ch_mult) - 1)}, "
                         f"file says {cfg.downsample}")
    return cfg
