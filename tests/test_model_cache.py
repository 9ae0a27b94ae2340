"""KV-cache primitives agree with the packed training forward on the same logical sequence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from irg_jax.model import config as model_config, kv_cache
from irg_jax.model.bagel import Bagel
from irg_jax.model.config import latent_token_dim
from _segment_pack import pack_from_segments


@pytest.fixture(scope="module")
def model():
    cfg = model_config.tiny()
    m = Bagel(cfg, rngs=nnx.Rngs(0))
    # llm2vae is zero-initialised; make it non-trivial so velocities carry information
    m.llm2vae.kernel.set_value(jax.random.normal(jax.random.key(1), m.llm2vae.kernel.shape) * 0.2)
    return m


def test_cached_decoding_matches_packed_forward(model):
    cfg = model.cfg
    rng = np.random.default_rng(0)
    d_lat = latent_token_dim(cfg)
    text1 = [cfg.special_ids.bos, 5, 17, 42, cfg.special_ids.eos]
    text2 = [cfg.special_ids.bos, 9, 99, 3, 250, cfg.special_ids.eos]
    n_lat, n_vit = 4, 4
    segments = [(0, "text", text1), (0, "clean", n_lat), (0, "vit", n_vit), (0, "text", text2), (0, "noisy", n_lat)]
    pack, _, order = pack_from_segments(segments, cfg)
    batch = {k: jnp.asarray(v)[None] for k, v in pack.items()}
    clean = rng.normal(size=(1, n_lat, d_lat)).astype(np.float32)
    noisy_x = rng.normal(size=(1, n_lat, d_lat)).astype(np.float32)
    latent_pos = jnp.asarray([[0, 1, cfg.latent.max_latent_size, cfg.latent.max_latent_size + 1]], jnp.int32)
    vit_pos = jnp.asarray([[0, 1, cfg.vit.max_patches_per_side, cfg.vit.max_patches_per_side + 1]], jnp.int32)
    patches = jnp.asarray(rng.uniform(-1, 1, size=(1, n_vit, 3 * cfg.vit.patch_size ** 2)), jnp.float32)
    t = 0.6
    batch["vit_patches"], batch["vit_pos_ids"] = patches, vit_pos
    batch["latent_pos_ids"] = jnp.concatenate([latent_pos, latent_pos], axis=1)
    batch["latent_t"] = jnp.asarray([[0.0] * n_lat + [t] * n_lat], jnp.float32)
    batch["latent_noisy"] = batch["latent_t"] > 0
    # the training forward mixes x_t = (1 - t) x0 + t eps; choose x0 = eps = x so x_t = x exactly
    x0 = jnp.asarray(np.concatenate([clean, noisy_x], axis=1))
    full = nnx.jit(lambda m, b, x: m(b, x, x))(model, batch, x0)
    und_logits = np.asarray(full["ce_logits"][0])  # by storage position in [0, und_len)
    logical_to_storage = np.argsort(order)

    cache = kv_cache.init_cache(cfg, 1, 40)
    cache, hidden = nnx.jit(kv_cache.append_text)(model, cache, jnp.asarray([text1], jnp.int32))
    got = np.asarray(model.decoder.logits(hidden)[0])
    np.testing.assert_allclose(got, und_logits[logical_to_storage[:len(text1)]], atol=1e-5, rtol=1e-5)

    cache = nnx.jit(kv_cache.append_vae_image)(model, cache, jnp.asarray(clean), latent_pos)
    cache = nnx.jit(kv_cache.append_vit_image)(model, cache, patches, vit_pos)
    assert int(cache.length[0]) == len(text1) + n_lat + 2 + n_vit + 2 and int(cache.rope[0]) == len(text1) + 2

    decode = nnx.jit(kv_cache.decode_step)
    start = len(text1) + n_lat + 2 + n_vit + 2
    for j, token in enumerate(text2):
        logits, cache = decode(model, cache, jnp.asarray([token], jnp.int32))
        np.testing.assert_allclose(np.asarray(logits[0]), und_logits[logical_to_storage[start + j]],
                                   atol=1e-5, rtol=1e-5, err_msg=f"decode step {j}")

    velocity = nnx.jit(kv_cache.query_noisy_latents)(model, cache, jnp.asarray(noisy_x), jnp.asarray([t]),
                                                      latent_pos)
    np.testing.assert_allclose(np.asarray(velocity[0]), np.asarray(full["velocity"][0, n_lat:]), atol=1e-5,
                               rtol=1e-5)
    assert np.abs(np.asarray(velocity)).max() > 1e-2


def test_rows_are_independent_and_padding_aware(model):
    cfg = model.cfg
    append = nnx.jit(kv_cache.append_text)
    a, b = [7, 8, 9, 10, 11], [20, 21, 22]
    cache = kv_cache.init_cache(cfg, 3, 16)
    ids = jnp.asarray([a, b + [0, 0], [1] * 5], jnp.int32)
    cache, hidden = append(model, cache, ids, jnp.asarray([5, 3, 0], jnp.int32))
    np.testing.assert_array_equal(cache.length, [5, 3, 0])
    np.testing.assert_array_equal(cache.rope, [5, 3, 0])
    for row, seq in ((0, a), (1, b)):
        single, h1 = append(model, kv_cache.init_cache(cfg, 1, 16), jnp.asarray([seq], jnp.int32))
        n = len(seq)
        np.testing.assert_allclose(hidden[row, :n], h1[0], atol=1e-6)
        np.testing.assert_allclose(cache.keys[:, row, :n], single.keys[:, 0, :n], atol=1e-6)
        np.testing.assert_array_equal(np.asarray(cache.keys[:, row, n:]), 0.0)  # padding never written
    np.testing.assert_array_equal(np.asarray(cache.keys[:, 2]), 0.0)  # inactive row untouched
    # a second segment sees each row's own cache (bottom-right alignment per row)
    cache, hidden = append(model, cache, jnp.asarray([[3, 4]] * 3, jnp.int32))
    single, _ = append(model, kv_cache.init_cache(cfg, 1, 16), jnp.asarray([b], jnp.int32))
    single, h1 = append(model, single, jnp.asarray([[3, 4]], jnp.int32))
    np.testing.assert_allclose(hidden[1], h1[0], atol=1e-6)
    np.testing.assert_array_equal(cache.length, [7, 5, 2])
