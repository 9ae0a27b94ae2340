"""Start-up validation: a config mistake fails here with the key's name, not deep in JAX."""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterator

import ml_collections

from irg_jax.parallel.mesh import MESH_AXES, resolve_mesh_shape


class ConfigError(ValueError):
    """A config value is wrong; the message starts with the offending key."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"config.{key}: {reason}")
        self.key = key


def _flatten(d: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(d, (ml_collections.ConfigDict, dict)):
        for k in sorted(d.keys()):
            yield from _flatten(d[k], f"{prefix}{k}.")
    else:
        yield prefix[:-1], d


def reference_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The schema a config must match: the training schema plus the model and data schemas."""
    from irg_jax.config.schema import base_config
    ref = base_config()
    with ref.unlocked():
        if "model" in config:
            from irg_jax.model.config import tiny as model_schema
            ref.model = model_schema()
        if "data" in config:
            from irg_jax.data.config import default_data_config
            ref.data = default_data_config()
    return ref


def _check_keys(config, ref) -> None:
    have, want = dict(_flatten(config)), dict(_flatten(ref))
    for key in sorted(have):
        if key not in want and not any(key.startswith(w + ".") for w in want if want[w] is None):
            raise ConfigError(key, "unknown key (not in the schema; check the spelling)")
    for key in sorted(want):
        if key not in have and not any(key.startswith(h + ".") for h in have if have[h] is None):
            raise ConfigError(key, "missing key")
    for key, ref_value in want.items():
        value = have.get(key)
        if ref_value is None or value is None or key.endswith("rules") or key.startswith("data.groups"):
            continue
        ok = isinstance(value, type(ref_value)) or (isinstance(ref_value, float) and isinstance(value, int))
        if isinstance(ref_value, bool) != isinstance(value, bool):
            ok = False
        if not ok:
            raise ConfigError(key, f"expected {type(ref_value).__name__}, got {type(value).__name__} {value!r}")


def _check_mesh(config, num_devices: int) -> None:
    try:
        sizes = dict(zip(MESH_AXES, resolve_mesh_shape(dict(config.mesh), num_devices)))
    except ValueError as e:
        raise ConfigError("mesh", str(e).removeprefix("mesh: ")) from None
    shards = sizes["data"] * sizes["fsdp"]
    if config.batch_size % shards:
        raise ConfigError("batch_size", f"{config.batch_size} packs do not divide over data×fsdp = {shards} devices")
    for i, rule in enumerate(config.sharding.rules):
        if len(rule) != 2:
            raise ConfigError(f"sharding.rules[{i}]", f"expected (logical_name, mesh_axes), got {rule!r}")
        axes = rule[1]
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ConfigError(f"sharding.rules[{i}]", f"unknown mesh axis {bad}; mesh axes are {list(MESH_AXES)}")


def _check_training(config) -> None:
    if config.total_steps < 0:
        raise ConfigError("total_steps", f"must be >= 0 (0: export the initial parameters), got {config.total_steps}")
    positive = ["batch_size", "log_every", "checkpoint_every", "optim.grad_accum_steps", "checkpoint.keep"]
    flat = dict(_flatten(config))
    for key in positive:
        if key in flat and flat[key] <= 0:
            raise ConfigError(key, f"must be positive, got {flat[key]}")
    if config.optim.schedule not in ("constant", "cosine"):
        raise ConfigError("optim.schedule", f"must be 'constant' or 'cosine', got {config.optim.schedule!r}")
    if not (config.optim.lr > 0 and math.isfinite(config.optim.lr)):
        raise ConfigError("optim.lr", f"must be finite and > 0, got {config.optim.lr}")
    if config.optim.warmup_steps < 0:
        raise ConfigError("optim.warmup_steps", "must be >= 0")
    if not 0.0 <= config.ema.decay < 1.0:
        raise ConfigError("ema.decay", f"must be in [0, 1), got {config.ema.decay}")
    if config.checkpoint.init_from:
        if not os.path.exists(config.checkpoint.init_from):
            raise ConfigError("checkpoint.init_from", f"path does not exist: {config.checkpoint.init_from}")
        if config.checkpoint.init_from_kind not in ("params", "train_state"):
            raise ConfigError("checkpoint.init_from_kind", "must be 'params' or 'train_state' when init_from is set")


def _check_model(config) -> None:
    model = config.get("model")
    if model is None:
        return
    from irg_jax.model import remat
    policy = model.get("remat_policy", "nothing_saveable")
    if policy not in remat.POLICIES:
        raise ConfigError("model.remat_policy", f"{policy!r} is not one of {list(remat.POLICIES)}")
    if policy == "offload_dots" and model.get("remat", False):
        import jax
        if jax.default_backend() == "cpu":
            raise ConfigError("model.remat_policy", "'offload_dots' needs a backend with host memory "
                              "spaces (GPU, TPU); on CPU use 'nothing_saveable' or 'dots_saveable'")
    _check_attention(model.get("attention"))
    for key in ("mlp_chunk", "ce_chunk"):
        if int(model.get(key, 0)) < 0:
            raise ConfigError(f"model.{key}", f"must be >= 0 (0: no chunking), got {model.get(key)}")
    per_save = int(model.get("layers_per_save", 1))
    layers = model.get("llm", {}).get("num_layers", 1)
    if per_save < 1 or layers % per_save:
        raise ConfigError("model.layers_per_save", f"must be >= 1 and divide llm.num_layers={layers}, got {per_save}")
    limit = config.get("sharding", {}).get("max_unshardable_mib", 0)
    if limit is not None and limit < 0:
        raise ConfigError("sharding.max_unshardable_mib", f"must be >= 0 (or None: no limit), got {limit}")


def _check_attention(attn) -> None:
    if attn is None:
        return
    from irg_jax.model import attention
    if attn.get("impl") not in attention.names():
        raise ConfigError("model.attention.impl", f"{attn.get('impl')!r} is not one of {attention.names()}")
    for key in ("block_q", "block_k", "cache_block"):
        value = attn.get(key)
        if key == "cache_block" and value is None:
            continue  # configs saved before the key existed: the decoder's default (128)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"model.attention.{key}", f"must be a positive int, got {value!r}")
        if key == "cache_block":
            continue
        gpu = attention.resolve(attn.impl) == "pallas_gpu"
        if gpu and (value < 16 or value & (value - 1)):
            raise ConfigError(f"model.attention.{key}", f"pallas_gpu needs a power of two >= 16, got {value}")


def _check_budgets(config) -> None:
    if "data" not in config:
        return
    from irg_jax.data import config as data_config
    if hasattr(data_config, "check_data_config"):
        data_config.check_data_config(config.data, config.get("model"), ConfigError)


CHECKS: tuple[Callable[..., None], ...] = (_check_training, _check_model, _check_budgets)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise :class:`ConfigError` (naming the key) on the first problem found."""
    _check_keys(config, reference_config(config))
    if num_devices is None:
        import jax
        num_devices = jax.device_count()
    _check_mesh(config, num_devices)
    for check in CHECKS:
        check(config)
