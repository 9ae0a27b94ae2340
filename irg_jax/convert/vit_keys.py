"""Load the SigLIP encoder and connector from a BAGEL state dict (``ema.safetensors``).

Source keys (PyTorch, Linear weights stored (out, in)):
  vit_model.vision_model.embeddings.patch_embedding.{weight,bias}   (already Linear form,
      input ordered (py, px, c))
  vit_model.vision_model.embeddings.position_embedding.weight       [S*S, vit_hidden]
  vit_model.vision_model.encoder.layers.{i}.{layer_norm1,layer_norm2,self_attn.{q,k,v,out}_proj,
      mlp.fc1,mlp.fc2}.{weight,bias}
  vit_model.vision_model.post_layernorm.{weight,bias}
  connector.fc{1,2}.{weight,bias}

The official vit_config.json lists one more layer than the checkpoint holds (the
loaders subtract one); ``vit_cfg.num_layers`` must be the stored count. A mismatch is
reported as missing or unused keys.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from flax import nnx

from irg_jax.convert.param_loading import build_from_arrays, check_all_used, param_paths
from irg_jax.model.vit import Connector, SiglipEncoder

VIT_PREFIX = "vit_model.vision_model."
CONNECTOR_PREFIX = "connector."
_LAYER_PREFIX = VIT_PREFIX + "encoder.layers."


def siglip_source_key(path: str, prefix: str) -> str:
    """Our parameter path -> PyTorch key (without transposes)."""
    parts = path.split("/")
    leaf = {"kernel": "weight", "scale": "weight"}.get(parts[-1], parts[-1])
    head = parts[:-1]
    if prefix == VIT_PREFIX:
        if head == [] and leaf == "position_embedding":
            return VIT_PREFIX + "embeddings.position_embedding.weight"
        if head[:1] == ["patch_embedding"]:
            head = ["embeddings"] + head
        elif head[:1] == ["layers"]:
            head = ["encoder"] + head
    return prefix + ".".join(head + [leaf])


def _convert(path: str, prefix: str, tensors: Mapping[str, np.ndarray], used: set[str]):
    key = siglip_source_key(path, prefix)
    if key not in tensors:
        return None
    used.add(key)
    arr = np.asarray(tensors[key], np.float32)
    return key, (arr.T if path.endswith("kernel") else arr)


def _load(create, prefix: str, tensors: Mapping[str, np.ndarray], origin: str) -> nnx.Module:
    used: set[str] = set()
    values = {}
    for path in param_paths(create):
        converted = _convert(path, prefix, tensors, used)
        if converted is not None:
            values[path] = converted
    check_all_used(tensors, used, (prefix,), origin)
    return build_from_arrays(create, values, origin)


def load_vit_and_connector(tensors: Mapping[str, np.ndarray], vit_cfg, llm_hidden: int,
                           origin: str = "ema.safetensors") -> tuple[SiglipEncoder, Connector]:
    """Build (SiglipEncoder, Connector) from a BAGEL state dict.

    Every key under ``VIT_PREFIX`` and ``CONNECTOR_PREFIX`` is consumed exactly once
    (other keys are ignored); missing keys, unused keys and shape mismatches raise
    ValueError naming them.
    """
    stored = {int(k[len(_LAYER_PREFIX):].split(".")[0]) for k in tensors if k.startswith(_LAYER_PREFIX)}
    if stored and len(stored) != vit_cfg.num_layers:
        raise ValueError(f"{origin} holds {len(stored)} SigLIP layers but vit_cfg.num_layers is "
                         f"{vit_cfg.num_layers} (vit_config.json's num_hidden_layers is one more than the "
                         f"layers used; subtract one)")
    vit = _load(lambda: SiglipEncoder(vit_cfg, nnx.Rngs(0)), VIT_PREFIX, tensors, origin)
    connector = _load(lambda: Connector(vit_cfg.hidden_size, llm_hidden, nnx.Rngs(0)), CONNECTOR_PREFIX,
                      tensors, origin)
    return vit, connector
