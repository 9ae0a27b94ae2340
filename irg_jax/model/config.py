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
  attention:   impl (a name in irg_jax.model.attention's registry; 'auto': by backend), block_q, block_k

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
    c.ce_chunk = 0
    c.attention = ml_collections.ConfigDict({"impl": "auto", "block_q": 512, "block_k": 512})
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
    # 4096 tokens at a time, the [tokens, 152064] CE logits 1024 tokens at a time.
    c.mlp_chunk = 4096
    c.ce_chunk = 1024
    return c


def _read_json(folder: pathlib.Path, name: str, required: bool) -> dict | None:
    f = folder / name
    if not f.exists():
        if required:
            raise FileNotFoundError(f"{f}: required BAGEL config file is missing")
        return None
    return json.loads(f.read_text())


def from_bagel_dir(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The model config of an official BAGEL checkpoint folder.

    Reads ``llm_config.json`` and ``vit_config.json`` (required) and ``ae_config.json`` and
    ``bagel_config.json`` (optional; the released checkpoint has neither, so the FLUX AE
    sizes, ``max_latent_size`` 64 and the Qwen2.5 special ids are the defaults).
    The ViT json lists one layer more than the checkpoint holds (every official loader
    drops the last one), so ``vit.num_layers = num_hidden_layers - 1``.
    """
    folder = pathlib.Path(path)
    llm = _read_json(folder, "llm_config.json", True)
    vit = _read_json(folder, "vit_config.json", True)
    ae = _read_json(folder, "ae_config.json", False) or {}
    bagel = _read_json(folder, "bagel_config.json", False) or {}

    def need(d: dict, key: str, file: str):
        if key not in d:
            raise KeyError(f"{folder / file}: missing key {key!r}")
        return d[key]

    heads = need(llm, "num_attention_heads", "llm_config.json")
    hidden = need(llm, "hidden_size", "llm_config.json")
    llm_cfg = dict(
        hidden_size=hidden, num_layers=need(llm, "num_hidden_layers", "llm_config.json"), num_heads=heads,
        num_kv_heads=llm.get("num_key_value_heads", heads), head_dim=llm.get("head_dim") or hidden // heads,
        intermediate_size=need(llm, "intermediate_size", "llm_config.json"),
        vocab_size=need(llm, "vocab_size", "llm_config.json"), rope_theta=float(llm.get("rope_theta", 10000.0)),
        rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)), qk_norm=True)
    if llm.get("rope_scaling"):
        raise ValueError(f"{folder / 'llm_config.json'}: rope_scaling {llm['rope_scaling']} is not supported")
    if llm.get("tie_word_embeddings", False):
        raise ValueError(f"{folder / 'llm_config.json'}: tied embeddings are not supported (BAGEL unties them)")

    patch = need(vit, "patch_size", "vit_config.json")
    table_side = need(vit, "image_size", "vit_config.json") // patch
    side = bagel.get("vit_max_num_patch_per_side", table_side)
    if side != table_side:
        raise ValueError(f"{folder}: vit_max_num_patch_per_side {side} differs from the ViT position table side "
                         f"image_size/patch_size = {table_side}")
    vit_cfg = dict(hidden_size=need(vit, "hidden_size", "vit_config.json"),
                   intermediate_size=need(vit, "intermediate_size", "vit_config.json"),
                   num_heads=need(vit, "num_attention_heads", "vit_config.json"),
                   num_layers=need(vit, "num_hidden_layers", "vit_config.json") - 1,
                   patch_size=patch, max_patches_per_side=side,
                   layer_norm_eps=float(vit.get("layer_norm_eps", 1e-6)))
    act = bagel.get("connector_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"{folder / 'bagel_config.json'}: connector_act {act!r} is not supported")
    if bagel.get("interpolate_pos", False):
        raise ValueError(f"{folder / 'bagel_config.json'}: interpolate_pos=True is not supported")

    ae_cfg = {"kind": "flux"}
    for key in ("downsample", "z_channels", "scale_factor", "shift_factor", "ch", "ch_mult", "num_res_blocks",
                "in_channels", "out_ch"):
        if key in ae:
            ae_cfg[key] = ae[key]
    ids = bagel.get("special_token_ids")
    special = QWEN25_SPECIAL_IDS if ids is None else dict(
        bos=ids["bos_token_id"], eos=ids["eos_token_id"], start_of_image=ids["start_of_image"],
        end_of_image=ids["end_of_image"])
    return _model(
        llm=llm_cfg, vit=vit_cfg,
        latent=dict(patch_size=bagel.get("latent_patch_size", 2), max_latent_size=bagel.get("max_latent_size", 64),
                    timestep_shift=float(bagel.get("timestep_shift", 4.0))),
        autoencoder=ae_cfg, special_ids=special)


def latent_token_dim(model_cfg) -> int:
    """Values per latent token: patch_size**2 * z_channels."""
    return model_cfg.latent.patch_size ** 2 * model_cfg.autoencoder.z_channels
