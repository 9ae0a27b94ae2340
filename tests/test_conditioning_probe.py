"""The conditioning probe: its error split and its ablations on a real (tiny) training batch."""
import jax
import numpy as np
import pytest
from flax import nnx

from irg_jax.synthetic import conditioning_probe as probe


def test_error_split_separates_the_noise_from_the_image_part():
    rng = np.random.default_rng(0)
    eps = rng.normal(size=(20000, 6)).astype(np.float32)
    x0 = rng.uniform(-1, 1, size=(20000, 6)).astype(np.float32)
    wrong = rng.normal(scale=0.3, size=x0.shape).astype(np.float32)  # image error, independent of eps
    target = eps - x0
    r = probe.error_split(target + 0.5 * eps + wrong, target, eps, x0)
    assert r["noise"] == pytest.approx(0.25, rel=0.05)
    assert r["x0"] == pytest.approx(0.09, rel=0.05)
    assert r["unconditional"] == pytest.approx(1 / 3, rel=0.05)
    assert r["gain"] == pytest.approx(1 - 0.09 * 3, abs=0.03)
    exact = probe.error_split(target, target, eps, x0)
    assert exact["mse"] == 0 and exact["gain"] == 1


def test_ablations_take_away_text_or_positions():
    batch = {"text_ids": np.array([[1, 7, 9, 2, 0]]), "latent_pos_ids": np.arange(8)[None]}
    no_text = probe.ablate(batch, "no_text", np.random.default_rng(0), keep_ids=(1, 2))
    np.testing.assert_array_equal(no_text["text_ids"], [[1, 0, 0, 2, 0]])
    shuffled = probe.ablate(batch, "shuffled_positions", np.random.default_rng(0))
    assert sorted(shuffled["latent_pos_ids"][0]) == list(range(8))
    assert list(shuffled["latent_pos_ids"][0]) != list(range(8))
    np.testing.assert_array_equal(batch["latent_pos_ids"], np.arange(8)[None])  # the input is untouched
    with pytest.raises(ValueError, match="unknown ablation"):
        probe.ablate(batch, "no_images", np.random.default_rng(0))


def test_probe_on_a_training_batch(tmp_path):
    """A model whose llm2vae is zero predicts v = 0: the whole noise is missed (noise part ~ E[eps^2] = 1)
    and the image part is E[x0^2]; a random llm2vae makes the ablations change the result."""
    from irg_jax.config.irgl import irgl_config
    from irg_jax.data import pipeline
    from irg_jax.data.tokenizer import load_tokenizer
    from irg_jax.model.autoencoder import build_autoencoder
    from irg_jax.model.bagel import Bagel, gather_latent_tokens, latent_tokens
    from irg_jax.synthetic.world import generate

    world = tmp_path / "world"
    generate(world, num=40, seed=0)
    cfg = irgl_config(1, f"tiny,data_root={world}")
    data, _ = pipeline.make_train_iterator(cfg.data, cfg.model, load_tokenizer(cfg.data.tokenizer_path), seed=0,
                                           batch_size=2, process_index=0, process_count=1)
    batch = next(data)
    model, ae = Bagel(cfg.model, rngs=nnx.Rngs(0)), build_autoencoder(cfg.model.autoencoder, nnx.Rngs(1))
    key = jax.random.key(3)
    res = probe.probe_batch(model, ae, batch, cfg.model.latent.patch_size, [0.9], key, ablations=("full",))
    r = res["full"][0.9]
    noisy = batch["latent_noisy"].astype(bool)
    x0 = np.asarray(gather_latent_tokens(latent_tokens(ae, batch["vae_images"], jax.random.split(key)[0],
                                                       cfg.model.latent.patch_size), batch["latent_src"]))[noisy]
    assert r["noise"] == pytest.approx(1.0, rel=0.1)
    assert r["x0"] == pytest.approx(float((x0 ** 2).mean()), rel=0.1)

    model.llm2vae.kernel.set_value(jax.random.normal(jax.random.key(1), model.llm2vae.kernel.shape) * 0.2)
    res = probe.probe_batch(model, ae, batch, cfg.model.latent.patch_size, [0.9, 0.5], key)
    assert set(res) == {"full", "no_text", "shuffled_positions"} and set(res["full"]) == {0.9, 0.5}
    assert res["no_text"][0.9]["mse"] != res["full"][0.9]["mse"]
    assert res["shuffled_positions"][0.9]["mse"] != res["full"][0.9]["mse"]
