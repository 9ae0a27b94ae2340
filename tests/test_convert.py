"""irg_jax.convert: BAGEL folder <-> params checkpoint, streaming, validation, and loading the result.

The random checkpoints come from ``tests/_bagel_folders.py`` (BAGEL's key names and layout,
written independently of the key mapping under test, with sizes unlike the fixture's).
"""
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from irg_jax import convert
from irg_jax.convert import __main__ as cli
from irg_jax.convert.safetensors_stream import SafetensorsSource, write_streamed
from irg_jax.convert.plan import build_plan, validate
from irg_jax.convert.to_orbax import tokenizer_problems
from irg_jax.model import config as model_config
from irg_jax.convert import bagel_keys
from irg_jax.model.bagel import Bagel, gather_latent_tokens
from irg_jax.data.transforms import patchify
from irg_jax.model.embeddings import sincos_2d_table
from _official_pack import pack_from_official
from irg_jax.parallel.mesh import build_mesh
from irg_jax.convert import params_dir
from irg_jax.train import init_from, model_setup
from _bagel_folders import SIZES, bagel_shapes, write_bagel_folder, write_config_jsons
from _bagel_folders import fixture, random_state  # noqa: F401 (pytest fixtures)


# ----------------------------------------------------------------------------- fixture parity
def _ref_a_batch(fixture, cfg):
    ref = dict(np.load(fixture / "ref_a_train.npz"))
    plan = json.loads((fixture / "ref_a_train_plan.json").read_text())
    px = cfg.autoencoder.downsample * cfg.latent.patch_size
    pack, budgets, storage = pack_from_official(
        ref, [s["split_lens"] for s in plan["samples"]], [s["attn_modes"] for s in plan["samples"]],
        timestep_shift=cfg.latent.timestep_shift, pixels_per_token=px)
    tokens = patchify(np.transpose(ref["padded_latent"], (0, 2, 3, 1)), cfg.latent.patch_size)
    x0 = gather_latent_tokens(jnp.asarray(tokens.reshape(1, -1, tokens.shape[-1])),
                              jnp.asarray(pack["latent_src"])[None])
    noise = jnp.asarray(ref["noise"])[None]
    return ref, jax.tree.map(lambda a: jnp.asarray(a)[None], pack), x0, noise


def test_fixture_converts_and_reproduces_reference_a(fixture, tmp_path):
    """Convert the fixture (placing parameters on an 8-device mesh as they are read), load it as
    generation does, and reproduce Reference A's logits and velocities with the training
    forward; the FLUX AE comes along and reproduces Reference C's decode."""
    from irg_jax.inference.runner import load_export
    mesh = build_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    dst = convert.bagel_to_orbax(fixture, tmp_path / "ckpt", mesh=mesh, progress=False)
    cfg = params_dir.load_model_config(dst)
    assert cfg.vit.num_layers == json.loads((fixture / "vit_config.json").read_text())["num_hidden_layers"] - 1
    assert json.loads((dst / "export.json").read_text())["dtype"] == "float32"

    model, ae = load_export(dst)
    ref, batch, x0, noise = _ref_a_batch(fixture, cfg)
    out = nnx.jit(lambda m: m(batch, x0, noise))(model)
    nce = len(ref["ce_loss_indexes"])
    np.testing.assert_allclose(out["ce_logits"][0, :nce], ref["logits_ce"], atol=1e-4, rtol=1e-4)
    noisy = np.asarray(batch["latent_noisy"][0])
    np.testing.assert_allclose(out["velocity"][0][noisy], ref["v_pred"], atol=1e-4, rtol=1e-4)

    c = np.load(fixture / "ref_c_ae.npz")
    decoded = ae.decode(jnp.asarray(np.transpose(c["ae_decode_input"], (0, 2, 3, 1))))
    np.testing.assert_allclose(decoded, np.transpose(c["ae_decode_output"], (0, 2, 3, 1)), atol=1e-4, rtol=1e-4)


def test_converted_fixture_loads_through_training_init_from(fixture, tmp_path):
    """``checkpoint.init_from`` kind 'params' restores the converted tree sharded, unchanged."""
    dst = convert.bagel_to_orbax(fixture, tmp_path / "ckpt", progress=False)
    cfg = params_dir.load_model_config(dst)
    mesh = build_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    bundle, _ = model_setup.build(cfg, mesh, (("embed", "fsdp"),), seed=0,
                                  autoencoder=convert.load_autoencoder_for(dst, cfg))
    ckpt_cfg = ml_collections.ConfigDict({"init_from": str(dst), "init_from_kind": "params"})
    params = init_from.load_params(ckpt_cfg, bundle, mesh)
    embed = params["decoder"]["embed_tokens"]["embedding"]
    assert embed.sharding.spec[1] == "fsdp"
    tensors = load_file(str(fixture / "ema.safetensors"))
    np.testing.assert_array_equal(embed, tensors["language_model.model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["decoder"]["layers"][1]["gen"]["mlp"]["down_proj"]["kernel"],
                                  tensors["language_model.model.layers.1.mlp_moe_gen.down_proj.weight"].T)


# ----------------------------------------------------------------------------- round trips
def _assert_same_config(a, b):
    for group in ("llm", "vit", "latent", "autoencoder", "special_ids"):
        assert a[group].to_dict() == b[group].to_dict(), group


def test_random_fp32_scan_round_trip_is_exact(fixture, random_state, tmp_path):
    """3 layers, 6/3 heads, hidden 48; stacked layers; fp32 -> fp32 gives the identical tensors."""
    src = write_bagel_folder(tmp_path / "src", fixture, random_state)
    cli.main(cli._parse(["x", "bagel-to-orbax", str(src), str(tmp_path / "ckpt"), "--scan-layers", "--no-progress"]))
    ckpt = tmp_path / "ckpt"
    cfg = params_dir.load_model_config(ckpt)
    assert cfg.scan_layers and (ckpt / "ae.safetensors").is_file()
    assert (cfg.llm.num_layers, cfg.llm.num_heads, cfg.llm.num_kv_heads, cfg.llm.head_dim) == (3, 6, 3, 8)

    cli.main(cli._parse(["x", "orbax-to-bagel", str(ckpt), str(tmp_path / "back"), "--no-progress"]))
    back = load_file(str(tmp_path / "back" / "ema.safetensors"))
    assert sorted(back) == sorted(random_state)
    for key, value in random_state.items():
        assert back[key].dtype == np.float32 and np.array_equal(back[key], value), key
    _assert_same_config(model_config.from_bagel_dir(tmp_path / "back"), model_config.from_bagel_dir(src))
    vit_json = json.loads((tmp_path / "back" / "vit_config.json").read_text())
    assert vit_json["num_hidden_layers"] == SIZES["vit_layers"] + 1
    assert (tmp_path / "back" / "ae.safetensors").read_bytes() == (fixture / "ae.safetensors").read_bytes()


def test_random_bf16_source_round_trip_and_table_warning(fixture, random_state, tmp_path, caplog):
    """IRG's ema_bf16.safetensors, stored bf16, exported bf16: identical bits. A stored sin-cos
    table that differs from the rebuilt one only warns (it is rebuilt, not loaded)."""
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_state.items()}
    tensors["latent_pos_embed.pos_embed"] = (tensors["latent_pos_embed.pos_embed"].astype(np.float32)
                                             + 0.5).astype(ml_dtypes.bfloat16)
    src = write_bagel_folder(tmp_path / "src", fixture, tensors, weights_name="ema_bf16.safetensors")
    with caplog.at_level(logging.WARNING):
        ckpt = convert.bagel_to_orbax(src, tmp_path / "ckpt", dtype="bfloat16", progress=False)
    assert any("latent_pos_embed.pos_embed differs" in r.getMessage() for r in caplog.records)
    assert json.loads((ckpt / "export.json").read_text())["dtype"] == "bfloat16"

    back = convert.orbax_to_bagel(ckpt, tmp_path / "back", dtype="bfloat16", progress=False)
    out = load_file(str(back / "ema.safetensors"))
    assert sorted(out) == sorted(tensors)
    for key, value in tensors.items():
        if key == "latent_pos_embed.pos_embed":  # the rebuilt table, not the perturbed one
            value = sincos_2d_table(SIZES["max_latent"], SIZES["hidden"]).astype(ml_dtypes.bfloat16)
        assert out[key].dtype == ml_dtypes.bfloat16, key
        assert np.array_equal(out[key].view(np.uint16), value.view(np.uint16)), key


def test_training_export_to_bagel(tmp_path):
    """A params export written by training (params_dir.save_params, no source json) exports to a
    BAGEL folder whose generated json files give back the config and whose tensors map back
    to the same parameters through the model's in-memory key mapping."""
    cfg = model_config.tiny()
    abstract = nnx.split(nnx.eval_shape(lambda: Bagel(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)[1].to_pure_dict()
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)
    params_dir.save_params(tmp_path / "export", params, cfg, {"source": "ema", "step": 7, "dtype": "float32"})
    out = convert.orbax_to_bagel(tmp_path / "export", tmp_path / "bagel", progress=False)
    back_cfg = model_config.from_bagel_dir(out)
    _assert_same_config(back_cfg, cfg)
    back = bagel_keys.bagel_to_params(load_file(str(out / "ema.safetensors")), back_cfg).to_pure_dict()
    flat_a, flat_b = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (params, back))
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        assert np.array_equal(flat_a[k], flat_b[k]), k


def test_released_7b_layout_validates_from_its_header(tmp_path):
    """The 7B-MoT release's sizes (spec 2.1/2.2), json files without bagel_config.json: the
    config and the plan accept its key/shape header; nothing is allocated."""
    s7 = dict(hidden=3584, layers=28, heads=28, kv_heads=4, inter=18944, vocab=152064, vit_hidden=1152,
              vit_heads=16, vit_inter=4304, vit_layers=26, patch=14, vit_side=70, max_latent=64, latent_patch=2,
              rope_theta=1e6)
    write_config_jsons(tmp_path, s7, bagel_config=False)
    cfg = model_config.from_bagel_dir(tmp_path)
    _assert_same_config(cfg, model_config.bagel_7b_mot())
    cfg.scan_layers = True
    plan = build_plan(cfg)
    shapes = bagel_shapes(s7, cfg.autoencoder.z_channels)
    validate(shapes, plan, cfg, "ema.safetensors")
    assert len(plan.moves) == len(shapes) - 2  # all but the two sin-cos tables
    total = sum(int(np.prod(m.source_shape)) for m in plan.moves)
    assert total == sum(int(np.prod(a.shape)) for a in plan.params.values())  # the model's own count
    assert 14.5e9 < total < 14.7e9  # MoT: 2 x Qwen2.5-7B layers, shared embeddings, SigLIP


# ----------------------------------------------------------------------------- errors
def _convert_broken(tmp_path, fixture, tensors, **folder_kw):
    src = write_bagel_folder(tmp_path / "src", fixture, tensors, **folder_kw)
    with pytest.raises(convert.CheckpointMismatch) as e:
        convert.bagel_to_orbax(src, tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt").exists()  # validated before anything is written
    return e.value


def test_wrong_shape_names_the_key(fixture, random_state, tmp_path):
    t = dict(random_state)
    key = "language_model.model.layers.2.mlp_moe_gen.down_proj.weight"
    t[key] = np.zeros((SIZES["hidden"], SIZES["inter"] + 1), np.float32)
    err = _convert_broken(tmp_path, fixture, t)
    assert err.shapes == [f"{key}: shape (48, 81), expected (48, 80) (for decoder/layers/2/gen/mlp/down_proj/kernel)"]
    assert "shape mismatches (1):" in str(err) and not err.missing and not err.unused


def test_missing_and_extra_keys_are_listed(fixture, random_state, tmp_path):
    t = dict(random_state)
    del t["language_model.model.layers.1.self_attn.k_norm_moe_gen.weight"]
    t["language_model.model.layers.1.self_attn.rotary.inv_freq"] = np.zeros(4, np.float32)
    err = _convert_broken(tmp_path, fixture, t)
    assert err.missing == ["decoder/layers/1/gen/k_norm/scale <- "
                           "language_model.model.layers.1.self_attn.k_norm_moe_gen.weight"]
    assert err.unused == ["language_model.model.layers.1.self_attn.rotary.inv_freq"]
    assert "parameters with no source key (1):" in str(err) and "source keys not used by any parameter (1):" in str(err)


def test_config_json_checked_against_weights(fixture, random_state, tmp_path):
    """The ViT json must list one layer more than stored; llm sizes must match the tensors."""
    err = _convert_broken(tmp_path, fixture, random_state, vit_json_layers=SIZES["vit_layers"])
    assert any("one more than the checkpoint holds" in p and "hold 2 layers" in p for p in err.config), err
    assert "config values that contradict the checkpoint files" in str(err)

    t = {k: v for k, v in random_state.items() if ".layers.2." not in k or not k.startswith("language_model")}
    err = _convert_broken(tmp_path / "b", fixture, t)
    assert any("num_hidden_layers = 3, but the weights hold 2 layers" in p for p in err.config)
    assert len(err.missing) == 28  # every tensor of layer 2, both experts


def test_cli_reports_errors_with_exit_code(fixture, random_state, tmp_path, capsys):
    t = dict(random_state)
    t["vae2llm.weight"] = np.zeros((SIZES["hidden"], 7), np.float32)
    src = write_bagel_folder(tmp_path / "src", fixture, t)
    with pytest.raises(SystemExit) as e:
        cli.main(cli._parse(["x", "bagel-to-orbax", str(src), str(tmp_path / "ckpt"), "--no-progress"]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "vae2llm.weight: shape (48, 7), expected (48, 64)" in err
    assert "latent_patch_size**2 * z_channels" in err
    with pytest.raises(SystemExit):
        cli._parse(["x", "bagel-to-orbax", str(src), str(tmp_path / "o"), "--dtype", "float16"])


def test_tokenizer_checked_against_config(fixtures_dir):
    tok_dir = fixtures_dir / "irg_data" / "tokenizer"
    cfg = model_config.bagel_7b_mot()
    assert tokenizer_problems(tok_dir, cfg) == []  # Qwen2.5 ids, 151665 tokens <= 152064 rows
    cfg.llm.vocab_size = 1000
    cfg.special_ids.bos = 3
    problems = tokenizer_problems(tok_dir, cfg)
    assert any("<|im_start|> id is 151644, the model config says 3" in p for p in problems)
    assert any("more than llm_config.json vocab_size 1000" in p for p in problems)


# ----------------------------------------------------------------------------- pieces
def test_streamed_safetensors_writer(tmp_path):
    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones((5,), ml_dtypes.bfloat16),
              "c": np.zeros((0, 4), np.float32), "d": np.asarray([3], np.int64)}
    entries = [(k, v.shape, v.dtype) for k, v in arrays.items()]
    write_streamed(tmp_path / "x.safetensors", entries, arrays.__getitem__, metadata={"format": "pt"})
    got = load_file(str(tmp_path / "x.safetensors"))
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k
    with SafetensorsSource(tmp_path / "x.safetensors") as src:
        assert src.shape("b") == (2, 3) and src.nbytes("a") == 10 and src.metadata() == {"format": "pt"}
    with pytest.raises(ValueError, match="tensor b was declared"):
        write_streamed(tmp_path / "y.safetensors", entries, lambda k: arrays[k].astype(np.float64))
    assert not (tmp_path / "y.safetensors").exists()


def test_load_autoencoder_for(tmp_path):
    cfg = model_config.demo()
    assert convert.load_autoencoder_for(tmp_path, cfg) is not None  # identity: nothing to read
    with pytest.raises(FileNotFoundError, match="ae.safetensors"):
        convert.load_autoencoder_for(tmp_path, model_config.tiny())


def write_word_level_tokenizer(folder, vocab_size: int, special_ids) -> None:
    """A Hugging Face tokenizer.json (word level) with the fixture's special-token ids."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(special_ids.bos)}
    vocab.update({"<|im_start|>": special_ids.bos, "<|im_end|>": special_ids.eos,
                  "<|vision_start|>": special_ids.start_of_image, "<|vision_end|>": special_ids.end_of_image})
    assert len(vocab) <= vocab_size
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))


def test_generation_cli_runs_on_converted_checkpoint(fixture, tmp_path):
    """The fixture folder plus a tokenizer.json converts (tokenizer checked and copied) and
    ``python -m irg_jax.generate`` runs on the result (think, then image; no refinement round)."""
    generate = pytest.importorskip("irg_jax.generate", reason="irg_jax.generate is not written yet")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json", "ae_config.json",
                 "bagel_config.json"):
        shutil.copyfile(fixture / name, src / name)
    cfg = model_config.from_bagel_dir(src)
    write_word_level_tokenizer(src, cfg.llm.vocab_size, cfg.special_ids)
    ckpt = convert.bagel_to_orbax(src, tmp_path / "ckpt", progress=False)
    assert (ckpt / "tokenizer" / "tokenizer.json").is_file()

    out = tmp_path / "gen"
    assert generate.main(["--checkpoint", str(ckpt), "--prompt", "w5 w6 w7", "--out", str(out),
                          "--image_size", "32", "--num_steps", "2", "--max_think_tokens", "3",
                          "--max_prompt_tokens", "8", "--system_prompt", "w1 w2", "--num_refinements", "0"]) == 0
    result = json.loads((out / "0" / "result.json").read_text())
    assert len(result["turns"]) == 1 and (out / "0" / "turn1.png").is_file()


def test_plan_needs_a_key_rule_for_every_parameter(monkeypatch):
    rules = bagel_keys.key_rules
    monkeypatch.setattr(bagel_keys, "key_rules", lambda cfg: [r for r in rules(cfg) if r.source != "llm2vae.bias"])
    with pytest.raises(ValueError, match="llm2vae/bias"):
        build_plan(model_config.tiny())
