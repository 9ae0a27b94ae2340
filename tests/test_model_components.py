"""Parity of the standalone model components with the PyTorch references (bagel_tiny C, D and A)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from irg_jax.data.transforms import patchify
from irg_jax.model import embeddings as emb
from irg_jax.convert.ae_keys import ae_config_from_json, autoencoder_from_tensors, load_autoencoder
from irg_jax.model.autoencoder import FluxAutoEncoder, IdentityAutoEncoder, build_autoencoder, single_head_attention
from irg_jax.convert.param_loading import build_from_arrays
from irg_jax.model.vit import Connector, SiglipEncoder, vit_pos_embed_table
from irg_jax.convert.vit_keys import load_vit_and_connector
from irg_jax.parallel import sharding

TOL = dict(rtol=1e-4, atol=1e-4)


def _nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _vit_cfg(**overrides):
    cfg = dict(enabled=True, hidden_size=32, intermediate_size=64, num_heads=2, num_layers=2, patch_size=14,
               max_patches_per_side=10, layer_norm_eps=1e-6)
    return ml_collections.ConfigDict({**cfg, **overrides})


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    return fixtures_dir / "bagel_tiny"


@pytest.fixture(scope="module")
def ema(tiny):
    return load_file(str(tiny / "ema.safetensors"))


@pytest.fixture(scope="module")
def ae(tiny):
    return load_autoencoder(tiny / "ae.safetensors", ae_config_from_json(tiny / "ae_config.json"))


def test_sincos_tables_match_reference(tiny, ema):
    d = np.load(tiny / "ref_d_tables.npz")
    np.testing.assert_array_equal(emb.sincos_2d_table(3, 8), d["sincos_small_D8_grid3"])
    np.testing.assert_allclose(emb.sincos_2d_table(12, 64), d["latent_pos_embed_table"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(vit_pos_embed_table(_vit_cfg(), 64), d["vit_pos_embed_table"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(vit_pos_embed_table(_vit_cfg(), 64), ema["vit_pos_embed.pos_embed"], atol=1e-7)


def test_timestep_features_and_embedder(tiny, ema):
    d = np.load(tiny / "ref_d_tables.npz")
    t = jnp.asarray(d["timestep_values"])
    np.testing.assert_allclose(emb.timestep_features(t, 256), d["timestep_sinusoid_256"], **TOL)
    values = {f"fc{i}/{leaf}": (f"time_embedder.mlp.{j}.{src}", ema[f"time_embedder.mlp.{j}.{src}"].T
                                if leaf == "kernel" else ema[f"time_embedder.mlp.{j}.{src}"])
              for i, j in ((1, 0), (2, 2)) for leaf, src in (("kernel", "weight"), ("bias", "bias"))}
    embedder = build_from_arrays(lambda: emb.TimestepEmbedder(64, nnx.Rngs(0)), values, "ema.safetensors")
    np.testing.assert_allclose(embedder(t), d["timestep_embedder_out"], **TOL)


def test_patchify_conventions(tiny):
    d = np.load(tiny / "ref_d_tables.npz")
    image = d["patchify_image"].transpose(1, 2, 0)[None]
    np.testing.assert_array_equal(patchify(image, 14)[0], d["patchify_p14"])
    z = d["latent_patchify_input"].transpose(1, 2, 0)[None]
    tokens = patchify(jnp.asarray(z), 2)
    np.testing.assert_array_equal(tokens[0], d["latent_patchify_output"])
    np.testing.assert_array_equal(emb.unpatchify_latents(tokens, 2, 3, 2, 16), z)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(np.zeros((1, 30, 28, 3)), 14)


def test_flux_autoencoder_matches_reference_c(tiny, ae):
    c = np.load(tiny / "ref_c_ae.npz")
    x = _nhwc(c["ae_input"])
    mean, logvar = ae.posterior(x)
    np.testing.assert_allclose(mean, _nhwc(c["ae_mean"]), **TOL)
    np.testing.assert_allclose(logvar, _nhwc(c["ae_logvar"]), **TOL)
    z = ae.encode(x, _nhwc(c["ae_posterior_noise"]))
    np.testing.assert_allclose(z, _nhwc(c["ae_latent_scaled"]), **TOL)
    np.testing.assert_allclose(ae.decode(_nhwc(c["ae_decode_input"])), _nhwc(c["ae_decode_output"]), **TOL)
    np.testing.assert_allclose(ae.decode(z), _nhwc(c["ae_roundtrip_output"]), **TOL)
    # A PRNG key draws the posterior noise; without noise the caller must ask for the mean.
    z_key = ae.encode(x, jax.random.key(0))
    assert z_key.shape == z.shape and not np.allclose(z_key, z)
    with pytest.raises(ValueError, match="PRNG key"):
        ae.encode(x)
    np.testing.assert_allclose(ae.encode(x, sample=False), 0.3611 * (mean - 0.1159), rtol=1e-6, atol=1e-6)


def test_flux_autoencoder_padded_training_batch(tiny, ae):
    """Reference A encodes the pack's zero-padded 48x48 batch; latents depend on that padding."""
    a = np.load(tiny / "ref_a_train.npz")
    x = _nhwc(a["padded_images"])
    mean, logvar = ae.posterior(x)
    moments = np.concatenate([mean, logvar], axis=-1)
    np.testing.assert_allclose(moments, _nhwc(a["vae_moments"]), **TOL)
    z = ae.encode(x, _nhwc(a["vae_posterior_noise"]))
    np.testing.assert_allclose(z, _nhwc(a["padded_latent"]), **TOL)


def test_ae_attention_query_chunks_match_dense():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 10, 8))
    dense = single_head_attention(q, k, v, query_chunk=10)
    np.testing.assert_allclose(single_head_attention(q, k, v, query_chunk=4), dense, rtol=1e-6, atol=1e-6)
    weights = jax.nn.softmax(jnp.einsum("nqc,nkc->nqk", q, k) / np.sqrt(8), axis=-1)
    np.testing.assert_allclose(dense, jnp.einsum("nqk,nkc->nqc", weights, v), rtol=1e-5, atol=1e-5)


def test_autoencoder_loader_reports_bad_keys(tiny):
    cfg = ae_config_from_json(tiny / "ae_config.json")
    tensors = load_file(str(tiny / "ae.safetensors"))
    extra = dict(tensors, **{"encoder.bogus.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="encoder.bogus.weight"):
        autoencoder_from_tensors(extra, cfg)
    missing = {k: v for k, v in tensors.items() if k != "decoder.mid.attn_1.q.bias"}
    with pytest.raises(ValueError, match="decoder/mid/attn_1/q/bias"):
        autoencoder_from_tensors(missing, cfg)
    wrong = dict(tensors, **{"encoder.conv_in.bias": np.zeros(5, np.float32)})
    with pytest.raises(ValueError, match=r"encoder.conv_in.bias -> encoder/conv_in/bias: got \(5,\)"):
        autoencoder_from_tensors(wrong, cfg)


def test_identity_autoencoder_round_trip():
    cfg = ml_collections.ConfigDict(dict(kind="identity", downsample=4, z_channels=48, scale_factor=1.0,
                                         shift_factor=0.0))
    ae = build_autoencoder(cfg, nnx.Rngs(0))
    assert isinstance(ae, IdentityAutoEncoder) and not jax.tree.leaves(nnx.state(ae))
    images = jax.random.uniform(jax.random.key(1), (2, 16, 24, 3), minval=-1, maxval=1)
    z = ae.encode(images, jax.random.key(2))
    assert z.shape == (2, 4, 6, 48)
    np.testing.assert_array_equal(z[0, 1, 2, :3], images[0, 4, 8])  # cell (dy, dx, c): c fastest
    np.testing.assert_array_equal(ae.decode(z), images)
    cfg.z_channels = 12
    with pytest.raises(ValueError, match="z_channels"):
        build_autoencoder(cfg, nnx.Rngs(0))


def test_vit_and_connector_match_reference_a(tiny, ema):
    a = np.load(tiny / "ref_a_train.npz")
    vit, connector = load_vit_and_connector(ema, _vit_cfg(), 64)
    patches = jnp.asarray(a["packed_vit_tokens"])
    pos = jnp.asarray(a["packed_vit_position_ids"], jnp.int32)
    out = vit(patches, pos, jnp.zeros(6, jnp.int32))
    np.testing.assert_allclose(out, a["vit_out"], **TOL)
    np.testing.assert_allclose(connector(out), a["connector_out"], **TOL)

    # Batched, two images per pack, padding rows: each image only sees itself.
    pad = jnp.asarray(np.random.default_rng(0).normal(size=(3, 588)), jnp.float32)
    pack = jnp.concatenate([patches, patches[::-1], pad])
    pack_pos = jnp.concatenate([pos, pos[::-1], jnp.zeros(3, jnp.int32)])
    image_id = jnp.asarray([0] * 6 + [1] * 6 + [-1] * 3, jnp.int32)
    run = nnx.jit(lambda m, *xs: m(*xs))
    batched = run(vit, jnp.stack([pack, pack[::-1]]), jnp.stack([pack_pos, pack_pos[::-1]]),
                  jnp.stack([image_id, image_id[::-1]]))
    assert batched.shape == (2, 15, 32)
    np.testing.assert_allclose(batched[0, :6], a["vit_out"], **TOL)
    np.testing.assert_allclose(batched[0, 6:12], a["vit_out"][::-1], **TOL)
    np.testing.assert_allclose(batched[1, ::-1][:12], batched[0, :12], **TOL)
    assert np.isfinite(np.asarray(batched)).all()

    # bf16 compute stays within the bf16 tolerance suggested by the fixture README.
    out16 = vit(patches.astype(jnp.bfloat16), pos, jnp.zeros(6, jnp.int32))
    assert out16.dtype == jnp.bfloat16
    rel = np.sqrt(np.mean((np.asarray(out16, np.float32) - a["vit_out"]) ** 2) / np.mean(a["vit_out"] ** 2))
    assert rel < 0.03


def test_vit_loader_rejects_json_layer_count(ema):
    with pytest.raises(ValueError, match="holds 2 SigLIP layers but vit_cfg.num_layers is 3"):
        load_vit_and_connector(ema, _vit_cfg(num_layers=3), 64)
    with pytest.raises(ValueError, match="connector.fc2.weight"):
        load_vit_and_connector(ema, _vit_cfg(), 32)


def test_every_parameter_has_logical_axes(tiny):
    cfg = ae_config_from_json(tiny / "ae_config.json")
    modules = {
        "vit": lambda: SiglipEncoder(_vit_cfg(), nnx.Rngs(0)),
        "connector": lambda: Connector(32, 64, nnx.Rngs(0)),
        "time_embedder": lambda: emb.TimestepEmbedder(64, nnx.Rngs(0)),
        "linear": lambda: emb.Linear(4, 8, rngs=nnx.Rngs(0), axes=("embed", "mlp")),
        "flux_ae": lambda: FluxAutoEncoder(cfg, nnx.Rngs(0)),
    }
    for name, create in modules.items():
        _, state = nnx.split(nnx.eval_shape(create))
        flat = nnx.to_flat_state(state)
        assert flat, name
        for path, var in flat:
            assert isinstance(var, nnx.Param), (name, path)
            axes = sharding.logical_axes(var)
            assert axes is not None and len(axes) == len(var.get_value().shape), (name, path, axes)


def test_timestep_embedder_scale_multiplies_t():
    t = jnp.asarray([0.0, 0.25, 0.9, 1.0])
    plain = emb.TimestepEmbedder(32, nnx.Rngs(0))
    scaled = emb.TimestepEmbedder(32, nnx.Rngs(0), scale=1000.0)
    np.testing.assert_allclose(scaled(t), plain(1000.0 * t), rtol=1e-5, atol=1e-6)
    assert not np.allclose(scaled(t), plain(t))
