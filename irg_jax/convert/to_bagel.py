"""irg_jax params checkpoint -> BAGEL folder for the official PyTorch code (``orbax-to-bagel``).

Writes DST:
  ema.safetensors     every parameter under its BAGEL key (PyTorch layouts, chosen dtype),
                      plus the two sin-cos tables, as the official FSDP save writes them;
                      with ``max_shard_bytes``: ema-0000i-of-0000n.safetensors shards and
                      ema.safetensors.index.json ({"metadata": {"total_size"}, "weight_map"})
  llm_config.json     Qwen2 config (sizes from model_config.json; other fields from the
                      converted source's json when the checkpoint has ``bagel_configs/``)
  vit_config.json     SigLIP config; num_hidden_layers = layers + 1 (the official loaders
                      drop one)
  bagel_config.json   the BagelConfig values loaders pass in code, and the special ids
  ae_config.json, ae.safetensors   the FLUX autoencoder (copied from the checkpoint)
  tokenizer files     copied from ``CKPT/tokenizer/``

The parameters are restored once onto the host (CPU device, stored dtype); each BAGEL
tensor is then converted, cast and written before the next one is built.
"""
from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from irg_jax.convert import plan as plan_lib
from irg_jax.convert.autoencoder_file import AE_FILE
from irg_jax.convert.errors import ConvertError
from irg_jax.convert.safetensors_stream import write_streamed
from irg_jax.convert.shards import stale_weight_files, write_sharded
from irg_jax.convert.to_orbax import DTYPES, SOURCE_CONFIG_DIR
from irg_jax.model.config import latent_token_dim
from irg_jax.model.embeddings import sincos_2d_table
from irg_jax.convert import params_dir

WEIGHTS_OUT = "ema.safetensors"
WEIGHTS_STEM = "ema"  # shards: ema-0000i-of-0000n.safetensors + ema.safetensors.index.json


def _base(ckpt: pathlib.Path, name: str) -> dict:
    path = ckpt / SOURCE_CONFIG_DIR / name
    return json.loads(path.read_text()) if path.is_file() else {}


def _with_defaults(base: dict, defaults: dict) -> dict:
    """``base`` (the source json, key order kept) with ``defaults`` added where absent."""
    out = dict(base)
    for key, value in defaults.items():
        out.setdefault(key, value)
    return out


def llm_config_json(model_cfg, base: dict, dtype: str) -> dict:
    """Qwen2 ``llm_config.json`` as ``Qwen2Config.from_json_file`` reads it."""
    llm, ids = model_cfg.llm, model_cfg.special_ids
    if llm.head_dim * llm.num_heads != llm.hidden_size:
        raise ConvertError(f"head_dim {llm.head_dim} * num_heads {llm.num_heads} != hidden_size {llm.hidden_size}: "
                         f"the PyTorch Qwen2 attention cannot represent this model")
    out = _with_defaults(base, {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                                "max_position_embeddings": 32768, "rope_scaling": None, "use_sliding_window": False,
                                "attention_dropout": 0.0, "bos_token_id": ids.bos, "eos_token_id": ids.eos})
    out.update(hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
               num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
               num_key_value_heads=llm.num_kv_heads, vocab_size=llm.vocab_size, rope_theta=float(llm.rope_theta),
               rms_norm_eps=float(llm.rms_norm_eps), qk_norm=True, layer_module="Qwen2MoTDecoderLayer",
               tie_word_embeddings=False, torch_dtype=dtype)
    return out


def vit_config_json(model_cfg, base: dict, dtype: str) -> dict:
    """SigLIP ``vit_config.json``; lists one layer more than the weights hold (official quirk)."""
    vit = model_cfg.vit
    out = _with_defaults(base, {"model_type": "siglip_vision_model", "num_channels": 3,
                                "hidden_act": "gelu_pytorch_tanh", "attention_dropout": 0.0})
    out.update(hidden_size=vit.hidden_size, intermediate_size=vit.intermediate_size,
               num_hidden_layers=vit.num_layers + 1, num_attention_heads=vit.num_heads, patch_size=vit.patch_size,
               image_size=vit.max_patches_per_side * vit.patch_size, layer_norm_eps=float(vit.layer_norm_eps),
               torch_dtype=dtype)
    return out


def bagel_config_json(model_cfg, base: dict) -> dict:
    """The BagelConfig values the official loaders set in code (not an official file)."""
    ids = model_cfg.special_ids
    out = dict(base)
    out.update(visual_gen=True, visual_und=bool(model_cfg.vit.enabled), latent_patch_size=model_cfg.latent.patch_size,
               max_latent_size=model_cfg.latent.max_latent_size,
               vit_max_num_patch_per_side=model_cfg.vit.max_patches_per_side, connector_act="gelu_pytorch_tanh",
               interpolate_pos=False, timestep_shift=float(model_cfg.latent.timestep_shift),
               special_token_ids={"bos_token_id": ids.bos, "eos_token_id": ids.eos,
                                  "start_of_image": ids.start_of_image, "end_of_image": ids.end_of_image})
    return out


def ae_config_json(model_cfg, base: dict) -> dict:
    """FLUX ``AutoEncoderParams`` fields."""
    ae = model_cfg.autoencoder
    out = _with_defaults(base, {"resolution": 256})
    out.update(in_channels=ae.in_channels, downsample=ae.downsample, ch=ae.ch, out_ch=ae.out_ch,
               ch_mult=list(ae.ch_mult), num_res_blocks=ae.num_res_blocks, z_channels=ae.z_channels,
               scale_factor=float(ae.scale_factor), shift_factor=float(ae.shift_factor))
    return out


def restore_on_host(ckpt: pathlib.Path, plan: plan_lib.Plan, stored_dtype) -> dict:
    """{param path: jax Array on the CPU device} in the stored dtype (one host copy).

    The tree is requested with string keys: Orbax stores the integer keys of layer lists
    as strings.
    """
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    keys = {p: tuple(map(str, p)) for p in plan.params}
    abstract = plan.nested({keys[p]: jax.ShapeDtypeStruct(s.shape, stored_dtype) for p, s in plan.params.items()})
    shardings = plan.nested({keys[p]: cpu for p in plan.params})
    tree = params_dir.restore_params(ckpt, abstract, shardings, dtype=stored_dtype)
    out = {}
    for p, key in keys.items():
        node = tree
        for part in key:
            node = node[part]
        out[p] = node
    return out


def representable(model_cfg, origin) -> None:
    """ConvertError (one line) for the first model value the official PyTorch BAGEL cannot express."""
    where = f"{origin}/model_config.json"
    if not model_cfg.vit.enabled:
        raise ConvertError(f"{where}: vit.enabled is False; the official BAGEL code always builds the ViT")
    if not model_cfg.llm.get("qk_norm", True):
        raise ConvertError(f"{where}: llm.qk_norm is False; the official Qwen2-MoT layers always have q/k norms")
    if model_cfg.get("connector_act", "gelu_tanh") != "gelu_tanh":
        raise ConvertError(f"{where}: connector_act {model_cfg.connector_act!r}; the official connector is "
                           f"gelu_pytorch_tanh")
    scale = float(model_cfg.latent.get("time_scale", 1.0))
    if scale != 1.0:
        raise ConvertError(f"{where}: latent.time_scale {scale:g}; the official time embedder reads t unscaled "
                           f"(time_scale 1), so this model's time features cannot be expressed")


def orbax_to_bagel(ckpt_dir, dst_dir, *, dtype: str = "float32", include_tables: bool = True,
                   max_shard_bytes: int | None = None, progress: bool = True) -> pathlib.Path:
    """Export a params checkpoint (``bagel-to-orbax`` output or a training export) as a BAGEL folder.

    ``max_shard_bytes``: split the state dict into shards of at most that many tensor bytes
    with an index json (see the module docstring); None: one ``ema.safetensors``.
    """
    if dtype not in DTYPES:
        raise ConvertError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ConvertError(f"the maximum shard size must be positive, got {max_shard_bytes} bytes")
    ckpt, dst = pathlib.Path(ckpt_dir), pathlib.Path(dst_dir)
    try:
        model_cfg = params_dir.load_model_config(ckpt)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{ckpt / 'model_config.json'}: not valid JSON ({e})") from None
    representable(model_cfg, ckpt)
    if model_cfg.autoencoder.kind != "flux":
        logging.warning("%s: autoencoder kind %r; the official BAGEL code only runs the FLUX autoencoder, so "
                        "vae2llm/llm2vae (%d values per latent token) will not fit it", ckpt,
                        model_cfg.autoencoder.kind, latent_token_dim(model_cfg))
    plan = plan_lib.build_plan(model_cfg)
    info_path = ckpt / "export.json"
    stored = json.loads(info_path.read_text()).get("dtype", "float32") if info_path.is_file() else "float32"
    try:
        params = restore_on_host(ckpt, plan, jnp.dtype(stored))
    except ValueError as e:  # the stored tree does not fit model_config.json (names each key)
        raise ConvertError(str(e)) from None

    out_dtype = np.dtype(jnp.dtype(dtype))
    by_source = {m.source: m for m in plan.moves}
    d = model_cfg.llm.hidden_size
    tables = {}
    if include_tables:
        tables = {"latent_pos_embed.pos_embed": (model_cfg.latent.max_latent_size, d),
                  "vit_pos_embed.pos_embed": (model_cfg.vit.max_patches_per_side, d)}
    entries = [(k, by_source[k].source_shape, out_dtype) for k in sorted(by_source)]
    entries += [(k, (side * side, width), out_dtype) for k, (side, width) in sorted(tables.items())]

    def produce(key: str) -> np.ndarray:
        if key in tables:
            return sincos_2d_table(*tables[key]).astype(out_dtype)
        move = by_source[key]
        value = np.asarray(params[move.param])
        if move.layer is not None:
            value = value[move.layer]
        return np.ascontiguousarray(move.rule.to_source(value), dtype=out_dtype)

    dst.mkdir(parents=True, exist_ok=True)
    total = sum(int(np.prod(shape)) * out_dtype.itemsize for _, shape, _ in entries)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"params -> {WEIGHTS_OUT}", disable=not progress) as bar:
        if max_shard_bytes is None:
            for old in stale_weight_files(dst, WEIGHTS_STEM):  # an earlier sharded export: a stale second copy
                old.unlink()
            weights = write_streamed(dst / WEIGHTS_OUT, entries, produce, metadata={"format": "pt"},
                                     on_written=bar.update)
        else:
            (dst / WEIGHTS_OUT).unlink(missing_ok=True)  # loaders would prefer a stale single file
            weights = write_sharded(dst, entries, produce, int(max_shard_bytes), stem=WEIGHTS_STEM,
                                    metadata={"format": "pt"}, on_written=bar.update)
    del params

    files = {"llm_config.json": llm_config_json(model_cfg, _base(ckpt, "llm_config.json"), dtype),
             "vit_config.json": vit_config_json(model_cfg, _base(ckpt, "vit_config.json"), dtype),
             "bagel_config.json": bagel_config_json(model_cfg, _base(ckpt, "bagel_config.json"))}
    if model_cfg.autoencoder.kind == "flux":
        files["ae_config.json"] = ae_config_json(model_cfg, _base(ckpt, "ae_config.json"))
    for name, content in files.items():
        (dst / name).write_text(json.dumps(content, indent=2) + "\n")
    if (ckpt / AE_FILE).is_file():
        shutil.copyfile(ckpt / AE_FILE, dst / AE_FILE)
    else:
        logging.warning("%s: no %s; the official inference also needs the FLUX autoencoder weights", ckpt, AE_FILE)
    tokenizer = ckpt / "tokenizer"
    if tokenizer.is_dir():
        for f in tokenizer.iterdir():
            if f.is_file():
                shutil.copyfile(f, dst / f.name)
    logging.info("exported %s (%d tensors, %s) to %s", ckpt, len(entries), dtype, weights)
    return dst
