"""checkpoint.init_from checks the source against the run's model before restoring anything:
recorded model values (a converted checkpoint's model_config.json, a workdir checkpoint's
config item), keys and shapes; every difference is named in one error."""
import json

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from irg_jax import convert
from irg_jax.model.bagel import Bagel
from irg_jax.model import config as model_config
from irg_jax.parallel.mesh import build_mesh
from irg_jax.convert import params_dir
from irg_jax.train import checkpointing, init_from, model_setup
from irg_jax.train import state as state_lib

RULES = (("embed", "fsdp"),)


@pytest.fixture(scope="module")
def mesh():
    return build_mesh({"data": 1, "fsdp": -1, "tensor": 1})


@pytest.fixture(scope="module")
def converted(fixtures_dir, tmp_path_factory):
    return convert.bagel_to_orbax(fixtures_dir / "bagel_tiny", tmp_path_factory.mktemp("c") / "ckpt",
                                  progress=False)


def _bundle(model_cfg, mesh):
    return model_setup.build(model_cfg, mesh, RULES, seed=0)


def _ckpt_cfg(path, kind):
    return ml_collections.ConfigDict({"init_from": str(path), "init_from_kind": kind})


def test_converted_checkpoint_records_every_model_value(fixtures_dir, converted):
    """model_config.json holds the values of the BAGEL json files (not the defaults of a builder)."""
    recorded = params_dir.load_model_config(converted)
    bagel = json.loads((fixtures_dir / "bagel_tiny" / "bagel_config.json").read_text())
    llm = json.loads((fixtures_dir / "bagel_tiny" / "llm_config.json").read_text())
    assert recorded.llm.rope_theta == llm["rope_theta"] and recorded.llm.rms_norm_eps == llm["rms_norm_eps"]
    assert recorded.latent.max_latent_size == bagel["max_latent_size"]
    assert recorded.latent.timestep_shift == bagel["timestep_shift"]
    assert recorded.vit.max_patches_per_side == bagel["vit_max_num_patch_per_side"]
    assert recorded.special_ids.bos == bagel["special_token_ids"]["bos_token_id"]
    values = model_config.model_values(recorded)
    assert {"llm.rope_theta", "llm.rms_norm_eps", "special_ids.end_of_image", "latent.max_latent_size",
            "vit.max_patches_per_side", "latent.timestep_shift", "connector_act"} <= set(values)
    assert not set(values) & {"dtype", "remat", "mlp_chunk", "attention.impl"}  # how, not what, is computed


def test_params_init_from_names_every_model_value_that_differs(converted, mesh):
    """Same shapes, other values: refused, naming each value; the recorded config itself loads."""
    cfg = params_dir.load_model_config(converted)
    data = ml_collections.ConfigDict({"max_latent_size": cfg.latent.max_latent_size,
                                      "vit_max_patches_per_side": cfg.vit.max_patches_per_side})
    params = init_from.load_params(_ckpt_cfg(converted, "params"), _bundle(cfg, mesh)[0], mesh, data_cfg=data)
    assert params["decoder"]["embed_tokens"]["embedding"].shape == (cfg.llm.vocab_size, cfg.llm.hidden_size)

    wrong = params_dir.load_model_config(converted)
    wrong.llm.rope_theta = 10000.0
    wrong.llm.rms_norm_eps = 1e-5
    wrong.special_ids.eos = 299
    wrong.latent.timestep_shift = 3.0
    wrong.dtype = "bfloat16"  # a compute setting: not compared
    data.max_latent_size = 64
    with pytest.raises(init_from.InitFromMismatch) as e:
        init_from.load_params(_ckpt_cfg(converted, "params"), _bundle(wrong, mesh)[0], mesh, data_cfg=data)
    assert e.value.values == ["model.latent.timestep_shift: checkpoint 4.0, config 3.0",
                              "model.llm.rms_norm_eps: checkpoint 1e-06, config 1e-05",
                              "model.llm.rope_theta: checkpoint 1000000.0, config 10000.0",
                              "model.special_ids.eos: checkpoint 301, config 299",
                              "data.max_latent_size: checkpoint model.latent.max_latent_size = 12, config 64"]
    assert not e.value.missing and not e.value.unexpected and not e.value.shapes


def test_params_init_from_names_values_and_shapes(converted, mesh):
    """Another ViT grid and MLP width: the values and the shapes they change, together."""
    wrong = params_dir.load_model_config(converted)
    wrong.vit.max_patches_per_side = 8
    wrong.llm.intermediate_size = 96
    with pytest.raises(init_from.InitFromMismatch) as e:
        init_from.load_params(_ckpt_cfg(converted, "params"), _bundle(wrong, mesh)[0], mesh)
    assert e.value.values == ["model.llm.intermediate_size: checkpoint 128, config 96",
                              "model.vit.max_patches_per_side: checkpoint 10, config 8"]
    assert "vit/position_embedding: (100, 32) vs (64, 32)" in e.value.shapes
    assert "decoder/layers/0/gen/mlp/down_proj/kernel: (128, 64) vs (96, 64)" in e.value.shapes
    assert "shape mismatches (checkpoint vs model)" in str(e.value)


def _save_workdir(workdir, model_cfg, mesh, step=4):
    """A stage-1 workdir's checkpoint: a train state (random params on one device, no model
    init compiled) whose EMA differs from its params."""
    config = ml_collections.ConfigDict({"model": model_cfg, "checkpoint": {"keep": 1, "async_save": False}})
    abstract = nnx.split(nnx.eval_shape(lambda: Bagel(model_cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)[1]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jax.device_put(rng.normal(size=a.shape).astype(np.float32)),
                          abstract.to_pure_dict())
    state = state_lib.create(params, optax.sgd(1e-3), jax.random.key(0), True)
    state = state.replace(ema=jax.tree.map(lambda x: x + 1.0, params))
    ckpt = checkpointing.Checkpointer(workdir, config)
    ckpt.save(step, state, None)
    ckpt.close()
    return state


@pytest.mark.parametrize("scan", [False, True])
def test_train_state_init_from_other_layer_count_is_refused(tmp_path, mesh, scan):
    """A 2-layer workdir into a 1-layer model: the layer count and the keys or shapes it changes."""
    two = model_config.tiny()
    two.scan_layers = scan
    _save_workdir(tmp_path / "s1", two, mesh)
    one = model_config.tiny()
    one.scan_layers = scan
    one.llm.num_layers = 1
    with pytest.raises(init_from.InitFromMismatch) as e:
        init_from.load_params(_ckpt_cfg(tmp_path / "s1", "train_state"), _bundle(one, mesh)[0], mesh)
    err = e.value
    assert err.values == ["model.llm.num_layers: checkpoint 2, config 1"]
    assert "(step 4, ema)" in str(err).splitlines()[0]
    if scan:
        assert "decoder/layers/gen/mlp/down_proj/kernel: (2, 128, 64) vs (1, 128, 64)" in err.shapes
        assert not err.unexpected
    else:
        assert err.unexpected == ["decoder/layers/1/... (28 tensors)"] and not err.shapes


def test_train_state_init_from_other_width_and_layout_is_refused(tmp_path, mesh):
    """Mismatches that used to die with unrelated errors inside the restore are named."""
    _save_workdir(tmp_path / "s1", model_config.tiny(), mesh)
    other = model_config.tiny()
    other.vit.hidden_size = 48
    other.scan_layers = True
    with pytest.raises(init_from.InitFromMismatch) as e:
        init_from.load_params(_ckpt_cfg(tmp_path / "s1", "train_state"), _bundle(other, mesh)[0], mesh)
    assert e.value.values == ["model.scan_layers: checkpoint False, config True",
                              "model.vit.hidden_size: checkpoint 32, config 48"]
    assert "connector/fc1/kernel: (32, 64) vs (48, 64)" in e.value.shapes
    assert "decoder/layers/0/... (28 tensors)" in e.value.unexpected


def test_train_state_init_from_restores_the_ema(tmp_path, mesh):
    cfg = model_config.tiny()
    state = _save_workdir(tmp_path / "s1", cfg, mesh)
    bundle = _bundle(cfg, mesh)[0]
    params = init_from.load_params(_ckpt_cfg(tmp_path / "s1", "train_state"), bundle, mesh)
    assert jax.tree.structure(params) == jax.tree.structure(bundle.abstract_params)
    got = params["decoder"]["layers"][1]["gen"]["mlp"]["down_proj"]["kernel"]
    want = state.ema["decoder"]["layers"][1]["gen"]["mlp"]["down_proj"]["kernel"]
    np.testing.assert_array_equal(got, want)
    assert got.sharding == bundle.param_shardings["decoder"]["layers"][1]["gen"]["mlp"]["down_proj"]["kernel"]
