"""Which BAGEL tensor fills which parameter, and the checks run on a source before reading data.

The key mapping itself (names, transposes, per-head reshapes, ``_moe_gen`` copies) is
:func:`irg_jax.convert.bagel_keys.key_rules`; this module lays it out for streaming: one
:class:`Move` per source tensor, naming the parameter (and, with ``scan_layers``, the
layer slice of the stacked parameter) it fills, with both shapes known up front.

:func:`validate` compares a source's header (key -> shape, no data read) with the plan
and raises one :class:`CheckpointMismatch` listing every problem:

  config values that contradict the files     e.g. llm_config.json hidden_size vs the
                                              embed_tokens shape, layer counts vs layer keys
  parameters with no source key               "param path <- expected source key"
  source keys not used by any parameter       extra keys (the two sin-cos tables excepted)
  shape mismatches                            "source key: shape (..), expected (..)"
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

import jax
import numpy as np
from flax import nnx

from irg_jax.convert.errors import ConvertError
from irg_jax.convert import bagel_keys, vit_keys
from irg_jax.model.bagel import Bagel
from irg_jax.model.config import latent_token_dim
from irg_jax.parallel.sharding import logical_axes

LLM_LAYER_KEY = re.compile(r"^language_model\.model\.layers\.(\d+)\.")
VIT_LAYER_KEY = re.compile(r"^" + re.escape(vit_keys.VIT_PREFIX) + r"encoder\.layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class Move:
    """One source tensor <-> one parameter (or one layer slice of a stacked parameter)."""

    rule: bagel_keys.KeyRule
    param: tuple                    # path in the params pure dict
    layer: int | None               # index on the leading (layers) axis with scan_layers, else None
    param_shape: tuple[int, ...]    # shape of what this tensor fills (the slice when stacked)
    source_shape: tuple[int, ...]   # shape in the BAGEL file

    @property
    def source(self) -> str:
        return self.rule.source

    @property
    def param_name(self) -> str:
        name = "/".join(map(str, self.param))
        return name if self.layer is None else f"{name}[{self.layer}]"


@dataclasses.dataclass(frozen=True)
class Plan:
    moves: tuple[Move, ...]
    params: dict                    # param path -> jax.ShapeDtypeStruct (full, stacked shape)
    logical_axes: dict              # param path -> logical axis names

    def moves_by_param(self) -> dict[tuple, list[Move]]:
        """Moves grouped per parameter (layers in order), in a stable parameter order."""
        out: dict[tuple, list[Move]] = {}
        for move in self.moves:
            out.setdefault(move.param, []).append(move)
        for moves in out.values():
            moves.sort(key=lambda m: -1 if m.layer is None else m.layer)
        return dict(sorted(out.items(), key=lambda kv: "/".join(map(str, kv[0]))))

    def nested(self, leaves: Mapping[tuple, object]) -> dict:
        """{param path: leaf} -> the nested params pure dict (the Orbax tree layout)."""
        tree: dict = {}
        for path, leaf in leaves.items():
            node = tree
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = leaf
        return tree


def shape_after(fn: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of ``fn(x)`` for an ``x`` of ``shape``, on a zero-byte array (nothing allocated).

    The key rules only move data (transpose, reshape), which numpy does on a 'V0' array.
    """
    return tuple(int(d) for d in np.shape(fn(np.empty(shape, dtype="V0"))))


def build_plan(model_cfg) -> Plan:
    """The streaming plan of ``Bagel(model_cfg)`` (abstract: nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: Bagel(model_cfg, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    params = {tuple(p): jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype) for p, v in flat}
    axes = {tuple(p): logical_axes(v) for p, v in flat}
    by_name = {"/".join(map(str, p)): p for p in params}

    moves, seen = [], {}
    for rule in bagel_keys.key_rules(model_cfg):
        if rule.source in seen:
            raise ValueError(f"key_rules maps {rule.source} twice ({seen[rule.source]} and {rule.path})")
        seen[rule.source] = rule.path
        stacked = bagel_keys._stacked_path(rule.path) if model_cfg.scan_layers else None
        name, layer = stacked if stacked is not None else (rule.path, None)
        if name not in by_name:
            raise ValueError(f"key_rules maps {rule.source} to {rule.path}, which Bagel does not have")
        path = by_name[name]
        full = tuple(params[path].shape)
        if layer is not None and not 0 <= layer < full[0]:
            raise ValueError(f"{rule.source}: layer {layer} is outside the stacked {name} {full}")
        param_shape = full[1:] if layer is not None else full
        moves.append(Move(rule, path, layer, param_shape, shape_after(rule.to_source, param_shape)))
    filled: dict[tuple, list] = {}
    for m in moves:
        filled.setdefault(m.param, []).append(m.layer)
    complete = {p: layers == [None] or sorted(layers) == list(range(params[p].shape[0]))
                for p, layers in filled.items()}
    unmapped = sorted("/".join(map(str, p)) for p in params if not complete.get(p, False))
    if unmapped:
        raise ValueError(f"Bagel parameters without a (complete) BAGEL key rule: {unmapped}")
    return Plan(tuple(moves), params, axes)


class CheckpointMismatch(ConvertError):
    """A BAGEL source that does not fit the model config; the message lists every problem."""

    def __init__(self, origin: str, *, config=(), missing=(), unused=(), shapes=()):
        self.origin, self.config, self.missing = origin, list(config), list(missing)
        self.unused, self.shapes = list(unused), list(shapes)
        sections = [("config values that contradict the checkpoint files", self.config),
                    ("parameters with no source key", self.missing),
                    ("source keys not used by any parameter", self.unused),
                    ("shape mismatches", self.shapes)]
        lines = [f"{origin}: does not match the model config"]
        for title, items in sections:
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    - {item}" for item in items)
        super().__init__("\n".join(lines))


def _layer_indices(keys, pattern: re.Pattern) -> set[int]:
    return {int(m.group(1)) for k in keys if (m := pattern.match(k))}


def config_problems(shapes: Mapping[str, tuple[int, ...]], model_cfg) -> list[str]:
    """The config's sizes (from the json files) checked against the stored tensor shapes."""
    llm, vit = model_cfg.llm, model_cfg.vit
    lm, vm = bagel_keys.LLM, vit_keys.VIT_PREFIX
    problems = []

    def check(key: str, dim: int, want: int, what: str):
        if key in shapes and len(shapes[key]) > dim and shapes[key][dim] != want:
            problems.append(f"{what} = {want}, but {key} has shape {tuple(shapes[key])}")

    check(lm + "embed_tokens.weight", 0, llm.vocab_size, "llm_config.json vocab_size")
    check(lm + "embed_tokens.weight", 1, llm.hidden_size, "llm_config.json hidden_size")
    check("language_model.lm_head.weight", 0, llm.vocab_size, "llm_config.json vocab_size")
    check(lm + "layers.0.self_attn.q_proj.weight", 0, llm.num_heads * llm.head_dim,
          f"llm_config.json num_attention_heads * head_dim ({llm.num_heads} * {llm.head_dim})")
    check(lm + "layers.0.self_attn.k_proj.weight", 0, llm.num_kv_heads * llm.head_dim,
          f"llm_config.json num_key_value_heads * head_dim ({llm.num_kv_heads} * {llm.head_dim})")
    check(lm + "layers.0.self_attn.q_norm.weight", 0, llm.head_dim, "llm_config.json head_dim")
    check(lm + "layers.0.mlp.gate_proj.weight", 0, llm.intermediate_size, "llm_config.json intermediate_size")
    check("vae2llm.weight", 1, latent_token_dim(model_cfg),
          "latent_patch_size**2 * z_channels (bagel_config.json, ae_config.json)")
    stored = _layer_indices(shapes, LLM_LAYER_KEY)
    if stored and stored != set(range(llm.num_layers)):
        problems.append(f"llm_config.json num_hidden_layers = {llm.num_layers}, but the weights hold "
                        f"{len(stored)} layers (indices {min(stored)}..{max(stored)})")
    if vit.enabled:
        check(vm + "embeddings.patch_embedding.weight", 0, vit.hidden_size, "vit_config.json hidden_size")
        check(vm + "embeddings.patch_embedding.weight", 1, 3 * vit.patch_size ** 2,
              f"3 * vit_config.json patch_size**2 ({vit.patch_size})")
        check(vm + "embeddings.position_embedding.weight", 0, vit.max_patches_per_side ** 2,
              f"(vit_config.json image_size / patch_size)**2 ({vit.max_patches_per_side}**2)")
        check(vm + "encoder.layers.0.mlp.fc1.weight", 0, vit.intermediate_size, "vit_config.json intermediate_size")
        stored = _layer_indices(shapes, VIT_LAYER_KEY)
        if stored and stored != set(range(vit.num_layers)):
            problems.append(
                f"vit_config.json num_hidden_layers = {vit.num_layers + 1} means {vit.num_layers} SigLIP layers "
                f"(the json lists one more than the checkpoint holds; every official loader drops one), "
                f"but the weights hold {len(stored)} layers (indices {min(stored)}..{max(stored)})")
    return problems


def validate(shapes: Mapping[str, tuple[int, ...]], plan: Plan, model_cfg, origin: str) -> None:
    """Raise :class:`CheckpointMismatch` unless every key, shape and config value fits the plan."""
    wanted = {m.source: m for m in plan.moves}
    missing = [f"{m.param_name} <- {m.source}" for m in plan.moves if m.source not in shapes]
    unused = sorted(k for k in shapes if k not in wanted and k not in bagel_keys.TABLE_KEYS)
    bad = [f"{k}: shape {tuple(shapes[k])}, expected {wanted[k].source_shape} (for {wanted[k].param_name})"
           for k in sorted(wanted) if k in shapes and tuple(shapes[k]) != wanted[k].source_shape]
    config = config_problems(shapes, model_cfg)
    if missing or unused or bad or config:
        raise CheckpointMismatch(origin, config=config, missing=missing, unused=unused, shapes=bad)
