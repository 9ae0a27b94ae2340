"""Model configs: ``tiny`` (tests), ``demo`` (CPU demo), ``bagel_7b_mot`` and ``from_bagel_dir``.

Every builder returns the ``config.model`` ConfigDict with the same key set:

  llm:         hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size,
               vocab_size, rope_theta, rms_norm_eps, qk_norm
  vit:         enabled, hidden_size, intermediate_size, num_heads, num_layers (layers run),
               patch_size, max_patches_per_side, layer_norm_eps
  connector_act
  latent:      patch_size, max_latent_size, timestep_shift
  autoencoder: kind ('flux' | 'identity'), downsample, z_channels, scale_factor, shift_factor,
               ch, ch_mult, num_res_blocks, in_channels, out_ch
  special_ids: bos, eos, start_of_image, end_of_image
  dtype ('float32' | 'bfloat16'; parameters are always float32), remat, scan_layers
  remat_policy (what a rematerialised layer saves: irg_jax.model.remat.POLICIES)
  mlp_chunk    (tokens per MLP chunk, 0: whole sequence), ce_chunk (CE tokens per lm_head chunk, 0: all)
  layers_per_save (scanned decoder under nothing_saveable: one saved layer input per this many layers;
               the backward re-runs the others, irg_jax.model.layer_scan)
  attention:   impl (a name in irg_jax.model.attention's registry; 'auto': by backend), block_q, block_k,
               cache_block (KV-cache slots per step of inference's cache loop)

A latent token has ``latent.patch_size**2 * autoencoder.z_channels`` values. The identity
autoencoder is a pixel space-to-depth by ``downsample`` (z_channels = 3 * downsample**2).
"""
from __future__ import annotations

import json
import pathlib

import ml_collections

# Qwen2.5 token ids of <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|> (spec §2.10).
QWEN25_SPECIAL_IDS = dict(bos=151644, eos=151645, start_of_image=151652, end_of_image=151653)


def _model(*, llm: dict, vit: dict, latent: dict, autoencoder: dict, special_ids: dict,
           connector_act: str = "gelu_tanh") -> ml_collections.ConfigDict:
    vit = dict(vit)
    vit.setdefault("enabled", True)
    vit.setdefault("layer_norm_eps", 1e-6)
    llm = dict(llm)
    llm.setdefault("head_dim", llm["hidden_size"] // llm["num_heads"])
    llm.setdefault("rms_norm_eps", 1e-6)
    llm.setdefault("qk_norm", True)
    latent = dict(latent)
    latent.setdefault("time_scale", 1.0)  # t multiplier before the sinusoidal time features (BAGEL: 1)
    ae = dict(kind="flux", downsample=8, z_channels=16, scale_factor=0.3611, shift_factor=0.1159,
              ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, in_channels=3, out_ch=3)
    ae.update(autoencoder)
    ae["ch_mult"] = tuple(ae["ch_mult"])
    if ae["kind"] == "identity":
        ae.update(z_channels=3 * ae["downsample"] ** 2, scale_factor=1.0, shift_factor=0.0)
    c = ml_collections.ConfigDict()
    c.llm = ml_collections.ConfigDict(llm)
    c.vit = ml_collections.ConfigDict(vit)
    c.connector_act = connector_act
    c.latent = ml_collections.ConfigDict(latent)
    c.autoencoder = ml_collections.ConfigDict(ae)
    c.special_ids = ml_collections.ConfigDict(special_ids)
    c.dtype = "float32"
    c.remat = False
    c.remat_policy = "nothing_saveable"
    c.scan_layers = False
    c.mlp_chunk = 0
    c.layers_per_save = 1
    c.ce_chunk = 0
    # cache_block: cache slots read per step of the KV-cache loop in inference (cost follows the context)
    c.attention = ml_collections.ConfigDict({"impl": "auto", "block_q": 512, "block_k": 512, "cache_block": 128})
    return c


def tiny() -> ml_collections.ConfigDict:
    """Sizes of the tests' tiny random BAGEL: 2 layers, hidden 64, 4/2 heads, tiny FLUX AE."""
    return _model(
        llm=dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                 vocab_size=320, rope_theta=1e6),
        vit=dict(hidden_size=32, intermediate_size=64, num_heads=2, num_layers=2, patch_size=14,
                 max_patches_per_side=10),
        latent=dict(patch_size=2, max_latent_size=12, timestep_shift=4.0),
        autoencoder=dict(kind="flux", ch=32, ch_mult=(1, 1, 1, 2), num_res_blocks=1),
        special_ids=dict(bos=300, eos=301, start_of_image=302, end_of_image=303),
    )


def demo(vocab_size: int = 512) -> ml_collections.ConfigDict:
    """A ~2M-parameter model for the 2-core CPU demo (32x32 images, 4x4-pixel latent tokens)."""
    return _model(
        llm=dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384,
                 vocab_size=vocab_size, rope_theta=10000.0),
        vit=dict(hidden_size=64, intermediate_size=128, num_heads=2, num_layers=2, patch_size=8,
                 max_patches_per_side=8),
        latent=dict(patch_size=2, max_latent_size=16, timestep_shift=2.0),
        autoencoder=dict(kind="identity", downsample=2),
        special_ids=dict(bos=vocab_size - 4, eos=vocab_size - 3, start_of_image=vocab_size - 2,
                         end_of_image=vocab_size - 1),
    )


def bagel_7b_mot() -> ml_collections.ConfigDict:
    """The released BAGEL-7B-MoT sizes (Qwen2.5-7B backbone duplicated per expert, SigLIP-so400m)."""
    c = _model(
        llm=dict(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                 intermediate_size=18944, vocab_size=152064, rope_theta=1e6),
        vit=dict(hidden_size=1152, intermediate_size=4304, num_heads=16, num_layers=26, patch_size=14,
                 max_patches_per_side=70),
        latent=dict(patch_size=2, max_latent_size=64, timestep_shift=4.0),
        autoencoder=dict(kind="flux"),
        special_ids=QWEN25_SPECIAL_IDS,
    )
    c.dtype = "bfloat16"
    c.remat = True
    c.scan_layers = True
    # Bound the per-layer working set of a ~45k-token pack: the [tokens, 18944] MLP activations
    # 2048 tokens at a time, the [tokens, 152064] CE logits 512 tokens at a time (planner, stage 1
    # at 8 devices: 61.17 GiB with 4096 / 1024, 60.68 GiB with 2048 / 512).
    c.mlp_chunk = 2048
    c.ce_chunk = 512
    # One saved decoder-layer input per 2 layers: the saved stack is the largest activation of
    # the step (bf16 [28, 45056, 3584] per pack = 8.4 GiB, flat in the device count); halving it
    # costs one extra forward of every other layer (+10% executed FLOPs, `irg_jax.plan` prints it).
    # Planner, stage 1: 8 devices 60.68 -> 57.50 GiB, 64 devices 30.12 -> 26.56 GiB.
    c.layers_per_save = 2
    return c


class BagelConfigError(ValueError):
    """A BAGEL config json that cannot describe a model here; the message is one line naming the file."""


def _read_json(folder: pathlib.Path, name: str, required: bool) -> dict | None:
    f = folder / name
    if not f.exists():
        if required:
            raise FileNotFoundError(f"{f}: required BAGEL config file is missing")
        return None
    try:
        out = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BagelConfigError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise BagelConfigError(f"{f}: expected a JSON object, got {type(out).__name__}")
    return out


def from_bagel_dir(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The model config of an official BAGEL checkpoint folder.

    Reads ``llm_config.json`` and ``vit_config.json`` (required) and ``ae_config.json`` and
    ``bagel_config.json`` (optional; the released checkpoint has neither, so the FLUX AE
    sizes, ``max_latent_size`` 64 and the Qwen2.5 special ids are the defaults).
    The ViT json lists one layer more than the checkpoint holds (every official loader
    drops the last one), so ``vit.num_layers = num_hidden_layers - 1``.

    A value the model here cannot represent (tied embeddings, rope scaling, another
    activation, a ViT table side that contradicts the ViT json, ...) or a missing or
    mistyped key raises :class:`BagelConfigError` (one line, naming the file and key);
    a missing required file raises FileNotFoundError.
    """
    folder = pathlib.Path(path)
    llm = _read_json(folder, "llm_config.json", True)
    vit = _read_json(folder, "vit_config.json", True)
    ae = _read_json(folder, "ae_config.json", False) or {}
    bagel = _read_json(folder, "bagel_config.json", False) or {}

    def where(file: str, key: str) -> str:
        return f"{folder / file}: {key}"

    def need(d: dict, key: str, file: str, kind=int, default=None):
        if key not in d or d[key] is None:
            if default is not None:
                return default
            raise BagelConfigError(f"{where(file, key)} is missing")
        value = d[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise BagelConfigError(f"{where(file, key)} must be a positive integer, got {value!r}")
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise BagelConfigError(f"{where(file, key)} must be a positive number, got {value!r}")
            value = float(value)
        return value

    def refuse(file: str, key: str, value, why: str):
        raise BagelConfigError(f"{where(file, key)} = {value!r} is not supported ({why})")

    L, V, B = "llm_config.json", "vit_config.json", "bagel_config.json"
    heads = need(llm, "num_attention_heads", L)
    hidden = need(llm, "hidden_size", L)
    llm_cfg = dict(
        hidden_size=hidden, num_layers=need(llm, "num_hidden_layers", L), num_heads=heads,
        num_kv_heads=need(llm, "num_key_value_heads", L, default=heads),
        head_dim=need(llm, "head_dim", L, default=hidden // heads),
        intermediate_size=need(llm, "intermediate_size", L), vocab_size=need(llm, "vocab_size", L),
        rope_theta=need(llm, "rope_theta", L, float, 10000.0), rms_norm_eps=need(llm, "rms_norm_eps", L, float, 1e-6),
        qk_norm=True)
    if llm.get("rope_scaling"):
        refuse(L, "rope_scaling", llm["rope_scaling"], "positions here use plain RoPE")
    if llm.get("tie_word_embeddings", False):
        refuse(L, "tie_word_embeddings", llm["tie_word_embeddings"], "BAGEL keeps lm_head separate from the embedding")
    if llm.get("hidden_act", "silu") != "silu":
        refuse(L, "hidden_act", llm["hidden_act"], "the decoder MLP is SwiGLU with silu")
    if llm.get("use_sliding_window", False):
        refuse(L, "use_sliding_window", llm["use_sliding_window"], "attention here is never windowed")
    if "hidden_size" in llm and "head_dim" not in llm and hidden % heads:
        raise BagelConfigError(f"{where(L, 'hidden_size')} {hidden} is not a multiple of num_attention_heads "
                               f"{heads} (and no head_dim is given)")
    if llm_cfg["num_heads"] % llm_cfg["num_kv_heads"]:
        raise BagelConfigError(f"{where(L, 'num_attention_heads')} {heads} is not a multiple of "
                               f"num_key_value_heads {llm_cfg['num_kv_heads']}")

    patch = need(vit, "patch_size", V)
    image_size = need(vit, "image_size", V)
    if image_size % patch:
        raise BagelConfigError(f"{where(V, 'image_size')} {image_size} is not a multiple of patch_size {patch}")
    table_side = image_size // patch
    side = need(bagel, "vit_max_num_patch_per_side", B, default=table_side)
    if side != table_side:
        raise BagelConfigError(f"{where(B, 'vit_max_num_patch_per_side')} = {side} differs from the ViT position "
                               f"table side image_size/patch_size = {image_size}/{patch} = {table_side} "
                               f"({folder / V})")
    vit_layers = need(vit, "num_hidden_layers", V)
    if vit_layers < 2:
        raise BagelConfigError(f"{where(V, 'num_hidden_layers')} = {vit_layers}: the official loaders drop the last "
                               f"layer, so at least 2 are needed")
    if vit.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        refuse(V, "hidden_act", vit["hidden_act"], "the SigLIP MLP here is gelu with the tanh approximation")
    if vit.get("num_channels", 3) != 3:
        refuse(V, "num_channels", vit["num_channels"], "images are RGB")
    vit_cfg = dict(hidden_size=need(vit, "hidden_size", V), intermediate_size=need(vit, "intermediate_size", V),
                   num_heads=need(vit, "num_attention_heads", V), num_layers=vit_layers - 1,
                   patch_size=patch, max_patches_per_side=side,
                   layer_norm_eps=need(vit, "layer_norm_eps", V, float, 1e-6))
    if vit_cfg["hidden_size"] % vit_cfg["num_heads"]:
        raise BagelConfigError(f"{where(V, 'hidden_size')} {vit_cfg['hidden_size']} is not a multiple of "
                               f"num_attention_heads {vit_cfg['num_heads']}")
    act = bagel.get("connector_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        refuse(B, "connector_act", act, "the connector here is gelu with the tanh approximation")
    if bagel.get("interpolate_pos", False):
        refuse(B, "interpolate_pos", bagel["interpolate_pos"], "position tables are indexed, not interpolated")
    for key in ("visual_gen", "visual_und"):
        if not bagel.get(key, True):
            refuse(B, key, bagel[key], "the model here always has both the generation and the ViT branch")

    ae_cfg = {"kind": "flux"}
    for key in ("downsample", "z_channels", "ch", "num_res_blocks", "in_channels", "out_ch"):
        if key in ae:
            ae_cfg[key] = need(ae, key, "ae_config.json")
    for key in ("scale_factor", "shift_factor"):
        if key in ae:
            value = ae[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BagelConfigError(f"{where('ae_config.json', key)} must be a number, got {value!r}")
            ae_cfg[key] = float(value)
    if "ch_mult" in ae:
        mult = ae["ch_mult"]
        if not isinstance(mult, list) or not mult or not all(isinstance(m, int) and m > 0 for m in mult):
            raise BagelConfigError(f"{where('ae_config.json', 'ch_mult')} must be a list of positive integers, "
                                   f"got {mult!r}")
        ae_cfg["ch_mult"] = mult
    ids = bagel.get("special_token_ids")
    if ids is None:
        special = QWEN25_SPECIAL_IDS
    else:
        if not isinstance(ids, dict):
            raise BagelConfigError(f"{where(B, 'special_token_ids')} must be an object, got {ids!r}")
        names = dict(bos="bos_token_id", eos="eos_token_id", start_of_image="start_of_image",
                     end_of_image="end_of_image")
        special = {}
        for ours, theirs in names.items():
            value = ids.get(theirs)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BagelConfigError(f"{where(B, 'special_token_ids.' + theirs)} must be a token id "
                                       f"(integer >= 0), got {value!r}")
            special[ours] = value
    return _model(
        llm=llm_cfg, vit=vit_cfg,
        latent=dict(patch_size=need(bagel, "latent_patch_size", B, default=2),
                    max_latent_size=need(bagel, "max_latent_size", B, default=64),
                    timestep_shift=need(bagel, "timestep_shift", B, float, 4.0)),
        autoencoder=ae_cfg, special_ids=special)


# ----------------------------------------------------------------------------- recorded model values
# Keys of ``config.model`` that only choose how the model is computed (precision, memory,
# kernels); every other key is a model value that a checkpoint's weights were trained with.
EXECUTION_KEYS = ("dtype", "remat", "remat_policy", "mlp_chunk", "ce_chunk", "layers_per_save", "attention")
# ``config.data`` keys that copy a model value (position ids and patch grids are built with them).
DATA_COPIES = {"max_latent_size": "latent.max_latent_size", "vit_max_patches_per_side": "vit.max_patches_per_side",
               "latent_patch_size": "latent.patch_size", "vit_patch_size": "vit.patch_size",
               "vae_downsample": "autoencoder.downsample"}


def _listed(value):
    return [_listed(v) for v in value] if isinstance(value, (list, tuple)) else value


def _same(a, b) -> bool:
    """Equal as model values: tuples and lists alike, 1e6 == 1000000, True != 1."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def model_values(model_cfg) -> dict[str, object]:
    """Every model value of ``model_cfg`` as {dotted key: value} (tuples as lists).

    Left out: :data:`EXECUTION_KEYS`, the FLUX sizes of the identity autoencoder and the
    ViT sizes of a model without a ViT (neither is used).
    """
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    out: dict[str, object] = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                out[name] = _listed(value)

    walk({k: v for k, v in d.items() if k not in EXECUTION_KEYS}, "")
    if out.get("autoencoder.kind") == "identity":
        out = {k: v for k, v in out.items() if not k.startswith("autoencoder.") or k.split(".")[1] in
               ("kind", "downsample", "z_channels", "scale_factor", "shift_factor")}
    if out.get("vit.enabled") is False:
        out = {k: v for k, v in out.items() if not k.startswith("vit.") or k == "vit.enabled"}
    return out


def model_value_differences(recorded, wanted, data_cfg=None) -> tuple[list[str], list[str]]:
    """(differences, unrecorded): the model values of ``wanted`` (the run's ``config.model``,
    plus the copies in ``data_cfg``, see :data:`DATA_COPIES`) against ``recorded``.

    Each difference reads ``"model.llm.rope_theta: checkpoint 10000.0, config 1000000.0"``;
    ``unrecorded`` names values the recorded config does not hold (an older checkpoint).
    """
    rec, want = model_values(recorded), model_values(wanted)
    diffs, unrecorded = [], []
    for key in sorted(set(rec) | set(want)):
        if key not in want:
            continue  # a model value the running code no longer has
        if key not in rec:
            unrecorded.append(f"model.{key}")
        elif not _same(rec[key], want[key]):
            diffs.append(f"model.{key}: checkpoint {rec[key]!r}, config {want[key]!r}")
    if data_cfg is not None:
        for key, model_key in DATA_COPIES.items():
            if key in data_cfg and model_key in rec and not _same(_listed(data_cfg[key]), rec[model_key]):
                diffs.append(f"data.{key}: checkpoint model.{model_key} = {rec[model_key]!r}, "
                             f"config {data_cfg[key]!r}")
    return diffs, unrecorded


def latent_token_dim(model_cfg) -> int:
    """Values per latent token: patch_size**2 * z_channels."""
    return model_cfg.latent.patch_size ** 2 * model_cfg.autoencoder.z_channels
