"""The mapping between BAGEL ``ema.safetensors`` keys and :class:`irg_jax.model.bagel.Bagel` parameters.

One :class:`KeyRule` per (source key, parameter path); parameter paths are '/'-joined
and per layer (``decoder/layers/{i}/...``); with ``scan_layers`` the per-layer arrays are
stacked into ``decoder/layers/...`` on a leading axis. Conversions:

* PyTorch Linear weights (out, in) are transposed to (in, out) kernels;
* attention projections are reshaped to per-head kernels: q/k/v (D, H, head_dim) with
  bias (H, head_dim), o (H, head_dim, D);
* the und expert reads the plain names, the gen expert the ``_moe_gen`` copies, and the
  final norms are ``norm`` (und) and ``norm_moe_gen`` (gen);
* SigLIP and connector keys follow :mod:`irg_jax.convert.vit_keys`; the ViT patch
  embedding is already stored in Linear form, input ordered (py, px, c);
* the sin-cos tables ``latent_pos_embed.pos_embed`` / ``vit_pos_embed.pos_embed`` are
  rebuilt from the config, never loaded: when present they are only compared with the
  rebuilt ones (a mismatch means a wrong ``max_latent_size`` or ViT grid).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from irg_jax.convert import vit_keys
from irg_jax.model.bagel import Bagel
from irg_jax.model.embeddings import sincos_2d_table
from irg_jax.convert.param_loading import param_paths
from irg_jax.model.vit import Connector, SiglipEncoder

LLM = "language_model.model."
TABLE_KEYS = ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed")


@dataclasses.dataclass(frozen=True)
class KeyRule:
    source: str                               # PyTorch key
    path: str                                 # our parameter path ('/'-joined, per layer)
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_source: Callable[[np.ndarray], np.ndarray]


def _same(x):
    return x


def _transpose(x):
    return np.ascontiguousarray(np.asarray(x).T)


def _heads_in(heads: int, head_dim: int):
    """(H*hd, D) weight <-> (D, H, hd) kernel."""
    return (lambda w: np.asarray(w).T.reshape(-1, heads, head_dim),
            lambda k: np.ascontiguousarray(np.asarray(k).reshape(np.shape(k)[0], -1).T))


def _heads_bias(heads: int, head_dim: int):
    return (lambda b: np.asarray(b).reshape(heads, head_dim), lambda b: np.asarray(b).reshape(-1))


def _heads_out(heads: int, head_dim: int):
    """(D, H*hd) weight <-> (H, hd, D) kernel."""
    return (lambda w: np.asarray(w).T.reshape(heads, head_dim, -1),
            lambda k: np.ascontiguousarray(np.asarray(k).reshape(-1, np.shape(k)[-1]).T))


def key_rules(model_cfg) -> list[KeyRule]:
    """Every (source key, parameter) pair of a Bagel with this config (tables excluded)."""
    llm = model_cfg.llm
    hd = llm.head_dim
    rules: list[KeyRule] = []

    def add(source, path, conv=(_same, _same)):
        rules.append(KeyRule(source, path, *conv))

    linear = (_transpose, _transpose)
    add(LLM + "embed_tokens.weight", "decoder/embed_tokens/embedding")
    add("language_model.lm_head.weight", "decoder/lm_head/kernel", linear)
    add(LLM + "norm.weight", "decoder/norm_und/scale")
    add(LLM + "norm_moe_gen.weight", "decoder/norm_gen/scale")
    for i in range(llm.num_layers):
        for expert, sfx in (("und", ""), ("gen", "_moe_gen")):
            src, dst = f"{LLM}layers.{i}.", f"decoder/layers/{i}/{expert}/"
            add(f"{src}input_layernorm{sfx}.weight", dst + "input_layernorm/scale")
            add(f"{src}post_attention_layernorm{sfx}.weight", dst + "post_attention_layernorm/scale")
            for name, heads in (("q", llm.num_heads), ("k", llm.num_kv_heads), ("v", llm.num_kv_heads)):
                add(f"{src}self_attn.{name}_proj{sfx}.weight", dst + f"{name}_proj/kernel", _heads_in(heads, hd))
                add(f"{src}self_attn.{name}_proj{sfx}.bias", dst + f"{name}_proj/bias", _heads_bias(heads, hd))
            add(f"{src}self_attn.o_proj{sfx}.weight", dst + "o_proj/kernel", _heads_out(llm.num_heads, hd))
            if llm.qk_norm:
                add(f"{src}self_attn.q_norm{sfx}.weight", dst + "q_norm/scale")
                add(f"{src}self_attn.k_norm{sfx}.weight", dst + "k_norm/scale")
            for proj in ("gate_proj", "up_proj", "down_proj"):
                add(f"{src}mlp{sfx}.{proj}.weight", dst + f"mlp/{proj}/kernel", linear)
    for ours, theirs in (("fc1", "mlp.0"), ("fc2", "mlp.2")):
        add(f"time_embedder.{theirs}.weight", f"time_embedder/{ours}/kernel", linear)
        add(f"time_embedder.{theirs}.bias", f"time_embedder/{ours}/bias")
    for name in ("vae2llm", "llm2vae"):
        add(f"{name}.weight", f"{name}/kernel", linear)
        add(f"{name}.bias", f"{name}/bias")
    if model_cfg.vit.enabled:
        for module, prefix in (("vit", vit_keys.VIT_PREFIX), ("connector", vit_keys.CONNECTOR_PREFIX)):
            for sub in _module_param_paths(model_cfg, module):
                add(vit_keys.siglip_source_key(sub, prefix), f"{module}/{sub}",
                    linear if sub.endswith("kernel") else (_same, _same))
    return rules


def _module_param_paths(model_cfg, module: str) -> list[str]:
    vit = model_cfg.vit
    if module == "vit":
        create = lambda: SiglipEncoder(vit, nnx.Rngs(0))  # noqa: E731
    else:
        create = lambda: Connector(vit.hidden_size, model_cfg.llm.hidden_size, nnx.Rngs(0))  # noqa: E731
    return sorted(param_paths(create))


_LAYER_PATH = re.compile(r"^decoder/layers/(\d+)/(.*)$")


def _stacked_path(path: str) -> tuple[str, int] | None:
    m = _LAYER_PATH.match(path)
    return (f"decoder/layers/{m.group(2)}", int(m.group(1))) if m else None


def check_tables(tensors: Mapping[str, np.ndarray], model_cfg, origin: str) -> None:
    """Compare stored sin-cos tables (if any) with the ones the config rebuilds."""
    d = model_cfg.llm.hidden_size
    sides = {"latent_pos_embed.pos_embed": model_cfg.latent.max_latent_size,
             "vit_pos_embed.pos_embed": model_cfg.vit.max_patches_per_side}
    for key, side in sides.items():
        if key not in tensors:
            continue
        want = sincos_2d_table(side, d)
        got = np.asarray(tensors[key], np.float32)
        if got.shape != want.shape or not np.allclose(got, want, atol=1e-5):
            raise ValueError(f"{origin}: {key} {got.shape} differs from the sin-cos table rebuilt for a "
                             f"{side}x{side} grid {want.shape}; check max_latent_size / the ViT grid")


def bagel_to_params(tensors: Mapping[str, np.ndarray], model_cfg, origin: str = "ema.safetensors") -> nnx.State:
    """BAGEL state dict -> the ``nnx.Param`` state of ``Bagel(model_cfg)`` (float32).

    Raises ValueError naming every unused source key, every parameter left unfilled and
    every shape mismatch (with the source key).
    """
    check_tables(tensors, model_cfg, origin)
    abstract = nnx.eval_shape(lambda: Bagel(model_cfg, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    targets = {"/".join(map(str, p)): var for p, var in flat}

    values: dict[str, tuple[str, np.ndarray]] = {}
    stacks: dict[str, dict[int, tuple[str, np.ndarray]]] = {}
    used, unknown_path = set(), []
    for rule in key_rules(model_cfg):
        if rule.source not in tensors:
            continue
        used.add(rule.source)
        arr = rule.to_ours(np.asarray(tensors[rule.source], np.float32))
        stacked = _stacked_path(rule.path) if model_cfg.scan_layers else None
        if stacked is not None:
            stacks.setdefault(stacked[0], {})[stacked[1]] = (rule.source, arr)
        elif rule.path in targets:
            values[rule.path] = (rule.source, arr)
        else:
            unknown_path.append(f"{rule.source} -> {rule.path}")
    for path, per_layer in stacks.items():
        if sorted(per_layer) != list(range(model_cfg.llm.num_layers)):
            continue  # reported as missing below
        srcs = [per_layer[i][0] for i in range(len(per_layer))]
        shapes = {per_layer[i][1].shape for i in range(len(per_layer))}
        if len(shapes) != 1:
            raise ValueError(f"{origin}: layer shapes differ for {path}: {dict(zip(srcs, shapes))}")
        values[path] = (f"{srcs[0]} (and layers 1..{len(srcs) - 1})", np.stack([per_layer[i][1] for i in sorted(per_layer)]))

    unused = sorted(set(tensors) - used - set(TABLE_KEYS))
    missing = sorted(set(targets) - set(values))
    bad = [f"{values[p][0]} -> {p}: got {values[p][1].shape}, want {tuple(targets[p].shape)}"
           for p in sorted(values) if p in targets and values[p][1].shape != tuple(targets[p].shape)]
    if unused or missing or bad or unknown_path:
        raise ValueError(f"{origin}: cannot convert to Bagel parameters.\n"
                         f"  source keys not used: {unused}\n  parameters not filled: {missing}\n"
                         f"  shape mismatches: {bad}\n  rules without parameter: {unknown_path}")
    filled = [(p, var.replace(jnp.asarray(values["/".join(map(str, p))][1]))) for p, var in flat]
    return nnx.from_flat_state(filled)


def params_to_bagel(state: nnx.State, model_cfg, *, include_tables: bool = False) -> dict[str, np.ndarray]:
    """Our parameter state (or a gradient state of the same structure) -> BAGEL key names.

    With ``include_tables`` the two sin-cos tables are added, as the official FSDP save
    writes them.
    """
    flat = {"/".join(map(str, p)): np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
            for p, v in nnx.to_flat_state(state)}
    out: dict[str, np.ndarray] = {}
    used = set()
    for rule in key_rules(model_cfg):
        stacked = _stacked_path(rule.path) if model_cfg.scan_layers else None
        if stacked is not None and stacked[0] in flat:
            used.add(stacked[0])
            out[rule.source] = rule.to_source(flat[stacked[0]][stacked[1]])
        elif rule.path in flat:
            used.add(rule.path)
            out[rule.source] = rule.to_source(flat[rule.path])
    left = sorted(set(flat) - used)
    if left:
        raise ValueError(f"params_to_bagel: parameters without a BAGEL key: {left}")
    if include_tables:
        d = model_cfg.llm.hidden_size
        out["latent_pos_embed.pos_embed"] = sincos_2d_table(model_cfg.latent.max_latent_size, d)
        if model_cfg.vit.enabled:
            out["vit_pos_embed.pos_embed"] = sincos_2d_table(model_cfg.vit.max_patches_per_side, d)
    return out


def load_bagel(tensors: Mapping[str, np.ndarray], model_cfg, origin: str = "ema.safetensors") -> Bagel:
    """A Bagel built from a BAGEL state dict without random initialisation."""
    params = bagel_to_params(tensors, model_cfg, origin)
    abstract = nnx.eval_shape(lambda: Bagel(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    model = nnx.merge(graphdef, params, rest)
    model.rebuild_tables()
    return model
