"""Random BAGEL checkpoints in the official folder layout, for the conversion tests.

The weights are written with numpy + safetensors in BAGEL's key names and layout as documented
in tests/fixtures/bagel_tiny/README.md (independently of the key mapping under test), at
:data:`SIZES` (unlike the fixture's). The two pytest fixtures at the end are imported by the
test modules that use them (``fixture``: the tiny official folder; ``random_state``: random
weights at :data:`SIZES` with its autoencoder's latent channels).
"""
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from irg_jax.model.embeddings import sincos_2d_table

SIZES = dict(hidden=48, layers=3, heads=6, kv_heads=3, inter=80, vocab=96, vit_hidden=24, vit_heads=2,
             vit_inter=40, vit_layers=2, patch=14, vit_side=4, max_latent=5, latent_patch=2)


def bagel_shapes(s: dict, z_channels: int) -> dict[str, tuple[int, ...]]:
    """Every key of a Bagel state dict (official names) with its PyTorch shape (Linear: (out, in))."""
    d, hd = s["hidden"], s["hidden"] // s["heads"]
    out: dict[str, tuple[int, ...]] = {}
    lm = "language_model.model."
    out[lm + "embed_tokens.weight"] = (s["vocab"], d)
    out["language_model.lm_head.weight"] = (s["vocab"], d)
    out[lm + "norm.weight"] = out[lm + "norm_moe_gen.weight"] = (d,)
    for i in range(s["layers"]):
        for sfx in ("", "_moe_gen"):
            p = f"{lm}layers.{i}."
            out[f"{p}input_layernorm{sfx}.weight"] = out[f"{p}post_attention_layernorm{sfx}.weight"] = (d,)
            for name, heads in (("q", s["heads"]), ("k", s["kv_heads"]), ("v", s["kv_heads"])):
                out[f"{p}self_attn.{name}_proj{sfx}.weight"] = (heads * hd, d)
                out[f"{p}self_attn.{name}_proj{sfx}.bias"] = (heads * hd,)
            out[f"{p}self_attn.o_proj{sfx}.weight"] = (d, s["heads"] * hd)
            out[f"{p}self_attn.q_norm{sfx}.weight"] = out[f"{p}self_attn.k_norm{sfx}.weight"] = (hd,)
            out[f"{p}mlp{sfx}.gate_proj.weight"] = out[f"{p}mlp{sfx}.up_proj.weight"] = (s["inter"], d)
            out[f"{p}mlp{sfx}.down_proj.weight"] = (d, s["inter"])
    d_lat = s["latent_patch"] ** 2 * z_channels
    for key, n_out, n_in in (("time_embedder.mlp.0", d, 256), ("time_embedder.mlp.2", d, d),
                             ("vae2llm", d, d_lat), ("llm2vae", d_lat, d),
                             ("connector.fc1", d, s["vit_hidden"]), ("connector.fc2", d, d)):
        out[key + ".weight"], out[key + ".bias"] = (n_out, n_in), (n_out,)
    v, dv = "vit_model.vision_model.", s["vit_hidden"]
    out[v + "embeddings.patch_embedding.weight"] = (dv, 3 * s["patch"] ** 2)
    out[v + "embeddings.patch_embedding.bias"] = (dv,)
    out[v + "embeddings.position_embedding.weight"] = (s["vit_side"] ** 2, dv)
    for j in range(s["vit_layers"]):
        p = f"{v}encoder.layers.{j}."
        for name in ("layer_norm1", "layer_norm2"):
            out[f"{p}{name}.weight"] = out[f"{p}{name}.bias"] = (dv,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{p}self_attn.{proj}.weight"], out[f"{p}self_attn.{proj}.bias"] = (dv, dv), (dv,)
        out[f"{p}mlp.fc1.weight"], out[f"{p}mlp.fc1.bias"] = (s["vit_inter"], dv), (s["vit_inter"],)
        out[f"{p}mlp.fc2.weight"], out[f"{p}mlp.fc2.bias"] = (dv, s["vit_inter"]), (dv,)
    out[v + "post_layernorm.weight"] = out[v + "post_layernorm.bias"] = (dv,)
    out["latent_pos_embed.pos_embed"] = (s["max_latent"] ** 2, d)
    out["vit_pos_embed.pos_embed"] = (s["vit_side"] ** 2, d)
    return out


def random_bagel_state(s: dict, z_channels: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random weights for :func:`bagel_shapes` (norm weights near 1; exact sin-cos tables)."""
    out = {}
    for key, shape in bagel_shapes(s, z_channels).items():
        if key.endswith("pos_embed"):
            out[key] = sincos_2d_table(int(np.sqrt(shape[0])), shape[1])
        elif len(shape) == 2:
            out[key] = rng.normal(0, 1 / np.sqrt(shape[1]), shape).astype(np.float32)
        else:
            base = 1.0 if "norm" in key and key.endswith("weight") else 0.0
            out[key] = (base + 0.1 * rng.normal(size=shape)).astype(np.float32)
    return out


def write_config_jsons(folder, s, vit_json_layers=None, bagel_config=True):
    """llm/vit config json as the official loaders read them (+ bagel_config.json, not official)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "llm_config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": s["hidden"],
        "intermediate_size": s["inter"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"], "rope_theta": s.get("rope_theta", 1e4),
        "rms_norm_eps": 1e-6, "qk_norm": True, "tie_word_embeddings": False, "torch_dtype": "float32"}))
    (folder / "vit_config.json").write_text(json.dumps({
        "model_type": "siglip_vision_model", "hidden_size": s["vit_hidden"], "intermediate_size": s["vit_inter"],
        "num_hidden_layers": s["vit_layers"] + 1 if vit_json_layers is None else vit_json_layers,
        "num_attention_heads": s["vit_heads"], "num_channels": 3, "image_size": s["vit_side"] * s["patch"],
        "patch_size": s["patch"], "layer_norm_eps": 1e-6}))
    if bagel_config:
        v = s["vocab"]
        (folder / "bagel_config.json").write_text(json.dumps({
            "latent_patch_size": s["latent_patch"], "max_latent_size": s["max_latent"],
            "vit_max_num_patch_per_side": s["vit_side"], "timestep_shift": 3.0,
            "special_token_ids": {"bos_token_id": v - 4, "eos_token_id": v - 3, "start_of_image": v - 2,
                                  "end_of_image": v - 1}}))


def write_bagel_folder(folder, fixture, tensors, s=SIZES, weights_name="ema.safetensors", vit_json_layers=None):
    """An official-style folder: weights, config json and the fixture's FLUX AE."""
    write_config_jsons(folder, s, vit_json_layers)
    save_file(tensors, str(folder / weights_name))
    for name in ("ae.safetensors", "ae_config.json"):
        shutil.copyfile(fixture / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    """The tiny official BAGEL folder (tests/fixtures/bagel_tiny)."""
    return fixtures_dir / "bagel_tiny"


@pytest.fixture(scope="module")
def random_state(fixture):
    """Random weights at :data:`SIZES`, with the fixture autoencoder's latent channels."""
    z = json.loads((fixture / "ae_config.json").read_text())["z_channels"]
    return random_bagel_state(SIZES, z, np.random.default_rng(0))
