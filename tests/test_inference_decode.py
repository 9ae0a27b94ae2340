"""On-device decoding and the compiled IRG loop on a tiny random BAGEL."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from irg_jax.inference import feedback, irg_loop, sampling
from irg_jax.model import config as model_config, kv_cache
from irg_jax.model.autoencoder import build_autoencoder
from irg_jax.model.bagel import Bagel


@pytest.fixture(scope="module")
def model():
    return Bagel(model_config.tiny(), rngs=nnx.Rngs(0))


def test_scripted_rows_stop_at_eos_or_max_tokens():
    """A fake step function: row b emits script[b][n] after n fed tokens; the 'cache' counts writes."""
    eos, vocab = 9, 12
    script = jnp.asarray([[5, 6, eos, 7, 7, 7], [1, 2, 3, 4, 5, 6], [eos, 1, 1, 1, 1, 1]], jnp.int32)

    def step_fn(fed, tokens, active):
        nxt = script[jnp.arange(3), fed]
        return 10.0 * jax.nn.one_hot(nxt, vocab), fed + active.astype(jnp.int32)

    keys = jax.random.split(jax.random.key(0), 3)
    run = jax.jit(lambda fed: sampling.generate(step_fn, fed, jnp.zeros((3,), jnp.int32), keys, max_tokens=5,
                                                eos_id=eos, settings=sampling.TextSampling(0.0)))
    fed, out = run(jnp.zeros((3,), jnp.int32))
    np.testing.assert_array_equal(out.length, [2, 4, 0])
    np.testing.assert_array_equal(out.ended, [True, False, True])
    np.testing.assert_array_equal(out.ids[0, :2], [5, 6])
    np.testing.assert_array_equal(out.ids[1], [1, 2, 3, 4])  # max_tokens 5 -> at most 4 text tokens
    np.testing.assert_array_equal(fed, [3, 5, 1])  # fed = [bos] + ids: exactly the tokens in the cache
    # an inactive row is neither fed nor emits
    fed, out = jax.jit(lambda: sampling.generate(step_fn, jnp.zeros((3,), jnp.int32), jnp.zeros((3,), jnp.int32),
                                                 keys, max_tokens=5, eos_id=eos, active=jnp.asarray([1, 0, 1], bool)))()
    np.testing.assert_array_equal(fed[1], 0)
    assert int(out.length[1]) == 0


def test_top_k_and_top_p_filters():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 4.9]])
    keys = jax.random.split(jax.random.key(1), 2)
    greedy = sampling.next_tokens(logits, keys, sampling.TextSampling(0.0))
    np.testing.assert_array_equal(greedy, [1, 0])
    for settings in (sampling.TextSampling(5.0, top_k=1), sampling.TextSampling(5.0, top_p=0.01)):
        for seed in range(5):
            keys = jax.random.split(jax.random.key(seed), 2)
            np.testing.assert_array_equal(sampling.next_tokens(logits, keys, settings), [1, 0])
    draws = {int(sampling.next_tokens(logits, jax.random.split(jax.random.key(s), 2), sampling.TextSampling(
        5.0, top_k=2))[0]) for s in range(40)}
    assert draws == {1, 3}  # a hot temperature samples both survivors, never the filtered ones


def _reference_decode(model, context, steps, settings, key):
    """Step by step: recompute the whole sequence with a full prefill, pick the next token."""
    cfg = model.cfg
    width = len(context) + steps
    prefill = nnx.jit(kv_cache.append_text)
    seq, logits_all = list(context), []
    for j in range(steps):
        arr = np.zeros((1, width), np.int32)
        arr[0, :len(seq)] = seq
        _, hidden = prefill(model, kv_cache.init_cache(cfg, 1, width), jnp.asarray(arr),
                            jnp.asarray([len(seq)], jnp.int32))
        logits = model.decoder.logits(hidden[:, len(seq) - 1])
        logits_all.append(np.asarray(logits[0]))
        nxt = int(sampling.next_tokens(logits, jax.random.fold_in(key, j)[None], settings)[0])
        if nxt == cfg.special_ids.eos or j + 1 == steps:
            break
        seq.append(nxt)
    return seq[len(context):], np.stack(logits_all)


@nnx.jit(static_argnames="max_tokens")
def _prefill_and_generate(model, ids, lens, keys, temperature, max_tokens):
    cache = kv_cache.init_cache(model.cfg, ids.shape[0], 32)
    cache, _ = kv_cache.append_text(model, cache, ids, lens)
    return sampling.generate_segment(model, cache, keys, max_tokens=max_tokens,
                                     settings=sampling.TextSampling(temperature))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_device_decode_matches_full_recompute(model, temperature):
    cfg = model.cfg
    bos, eos = cfg.special_ids.bos, cfg.special_ids.eos
    contexts = [[bos, 11, 22, 33, eos, bos, 101, 102, eos], [bos, 7, eos, bos, 5, 6, 250, 3, 99, 12, eos]]
    max_tokens = 7
    keys = jnp.stack([jax.random.key(3), jax.random.key(4)])
    settings = sampling.TextSampling(temperature)
    ids = np.zeros((2, 12), np.int32)
    for i, c in enumerate(contexts):
        ids[i, :len(c)] = c
    cache, out = _prefill_and_generate(model, jnp.asarray(ids), jnp.asarray([len(c) for c in contexts], jnp.int32),
                                       keys, jnp.float32(temperature), max_tokens)
    for row, context in enumerate(contexts):
        want, want_logits = _reference_decode(model, context + [bos], max_tokens, settings, keys[row])
        n = int(out.length[row])
        assert out.ids[row, :n].tolist() == want, f"row {row}"
        np.testing.assert_allclose(out.first_logits[row], want_logits[0], atol=2e-5, rtol=2e-5)
        # the cache now holds exactly context + [bos] ids [eos], as a fresh prefill of that text would
        full = context + [bos] + want + [eos]
        assert int(cache.length[row]) == len(full) and int(cache.rope[row]) == len(full)
        ref_cache, _ = kv_cache.append_text(model, kv_cache.init_cache(cfg, 1, 32), jnp.asarray([full], jnp.int32))
        np.testing.assert_allclose(cache.keys[:, row, :len(full)], ref_cache.keys[:, 0, :len(full)], atol=2e-5)
        np.testing.assert_allclose(cache.values[:, row, :len(full)], ref_cache.values[:, 0, :len(full)], atol=2e-5)


def test_canonical_segment_layout():
    gen = sampling.Generated(jnp.asarray([[4, 5, 6], [7, 0, 0]]), jnp.asarray([3, 1]), jnp.asarray([True, True]),
                             jnp.zeros((2, 1)))
    seg, n = irg_loop.canonical_segment(gen, 300, 301)
    np.testing.assert_array_equal(seg, [[300, 4, 5, 6, 301], [300, 7, 301, 0, 0]])
    np.testing.assert_array_equal(n, [5, 3])


# ---------------------------------------------------------------------------- the compiled loop

@pytest.fixture(scope="module")
def program(model):
    model.llm2vae.kernel.set_value(jax.random.normal(jax.random.key(1), model.llm2vae.kernel.shape) * 0.2)
    ae = build_autoencoder(model.cfg.autoencoder, nnx.Rngs(1))
    return irg_loop.IRGProgram(model, ae)


def _inputs(cfg, prompts, width=10):
    bos, eos = cfg.special_ids.bos, cfg.special_ids.eos
    sys_ids = np.tile(np.asarray([[bos, 1, 2, 3, eos]], np.int32), (len(prompts), 1))
    p_ids = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        p_ids[i, :len(p) + 2] = [bos] + p + [eos]
    return sys_ids, np.full(len(prompts), 5, np.int32), p_ids, np.asarray([len(p) + 2 for p in prompts], np.int32)


def test_irg_loop_feeds_the_image_back_and_compiles_once_per_bucket(program, model):
    cfg = model.cfg
    icfg = irg_loop.InferenceConfig(image_size=(32, 32), num_steps=3, max_think_tokens=5, temperature=0.0,
                                    vit_max_size=28, vit_min_size=28)
    static, dyn = icfg.static(), icfg.dynamic()
    # rows 0 and 1: same prompt, greedy text, different image noise; row 2 repeats row 0's key
    keys = irg_loop.row_keys_for(0, [0, 1, 0])
    turns = program(static, dyn, *_inputs(cfg, [[40, 41], [40, 41], [40, 41]]), keys)
    t1, t2 = irg_loop.as_host(turns)
    assert t1["image"].shape == (3, 32, 32, 3) and t1["image"].dtype == np.uint8
    np.testing.assert_array_equal(t1["think"].ids[0], t1["think"].ids[1])  # same context, greedy
    np.testing.assert_array_equal(t1["think"].first_logits[0], t1["think"].first_logits[1])
    assert np.abs(t1["image"][0].astype(int) - t1["image"][1]).max() > 0  # image 1 differs ...
    diff = np.abs(t2["think"].first_logits[0] - t2["think"].first_logits[1]).max()
    assert diff > 1e-3, "the reflection's logits do not depend on image 1: the image never entered the cache"
    np.testing.assert_allclose(t2["think"].first_logits[0], t2["think"].first_logits[2], atol=1e-5)  # same key
    assert program.num_traces == 1

    # new prompts and new seeds in the same bucket: no new compilation
    program(static, dyn, *_inputs(cfg, [[7, 8, 9], [10], [11, 12, 13, 14]]), irg_loop.row_keys_for(5, [0, 1, 2]))
    program(static, icfg.dynamic()._replace(temperature=jnp.float32(0.7)),
            *_inputs(cfg, [[1], [2], [3]]), irg_loop.row_keys_for(6, [0, 1, 2]))
    assert program.num_traces == 1
    # a new batch size is a new bucket (traced and lowered only: compiling it would add nothing)
    program.lower(static, dyn, *_inputs(cfg, [[1], [2]]), irg_loop.row_keys_for(6, [0, 1]))
    assert program.num_traces == 2


def test_a_given_think1_is_prefilled_like_the_sampled_one(program, model):
    cfg = model.cfg
    icfg = irg_loop.InferenceConfig(image_size=(32, 32), num_steps=3, max_think_tokens=5, temperature=0.0,
                                    num_refinements=0)
    static, dyn = icfg.static(), icfg.dynamic()
    inputs, keys = _inputs(cfg, [[40, 41], [7, 8, 9]]), irg_loop.row_keys_for(0, [0, 1])
    (sampled,) = irg_loop.as_host(program(static, dyn, *inputs, keys))
    seg, seg_len = irg_loop.canonical_segment(sampled["think"], cfg.special_ids.bos, cfg.special_ids.eos)
    (given,) = irg_loop.as_host(program(static, dyn, *inputs, keys, (seg, seg_len)))
    np.testing.assert_array_equal(given["think"].ids, sampled["think"].ids)
    np.testing.assert_array_equal(given["think"].length, sampled["think"].length)
    np.testing.assert_allclose(given["latents"], sampled["latents"], atol=1e-4)  # same context, same noise

    other = np.asarray(seg).copy()
    other[:, 1] = (other[:, 1] + 1) % (cfg.special_ids.bos - 1)  # another first word
    (changed,) = irg_loop.as_host(program(static, dyn, *inputs, keys, (other, seg_len)))
    assert np.abs(changed["latents"] - sampled["latents"]).max() > 1e-3, "image 1 ignores the given think"


def test_refine_start_restarts_from_the_fed_back_copy_of_image_1(program, model):
    cfg = model.cfg
    icfg = irg_loop.InferenceConfig(image_size=(32, 32), num_steps=3, max_think_tokens=5, temperature=0.0,
                                    vit_max_size=28, vit_min_size=28, refine_start=1e-4)
    static, dyn = icfg.static(), icfg.dynamic()
    keys = irg_loop.row_keys_for(0, [0, 1])
    t1, t2 = irg_loop.as_host(program(static, dyn, *_inputs(cfg, [[40, 41], [7, 8]]), keys))
    # turn 2 starts at t = 1e-4 from (almost) the re-encoded image 1 that was fed back, so it lands there
    hw = (32 // cfg.autoencoder.downsample, 32 // cfg.autoencoder.downsample, cfg.autoencoder.z_channels)
    eps = irg_loop._row_normal(irg_loop._row_keys(keys, 12), hw)
    fed_back = feedback.vae_tokens(build_autoencoder(cfg.autoencoder, nnx.Rngs(1)), jnp.asarray(t1["image"]), eps, cfg)
    np.testing.assert_allclose(t2["latents"], np.asarray(fed_back), atol=2e-3)
    assert np.abs(t2["latents"][0] - t2["latents"][1]).max() > 0.1


def test_refine_timestep_shift_changes_turn_2_only(program, model):
    cfg = model.cfg
    base = dict(image_size=(32, 32), num_steps=3, max_think_tokens=5, temperature=0.0, vit_max_size=28,
                vit_min_size=28, refine_start=0.6)
    same = irg_loop.InferenceConfig(**base)
    other = irg_loop.InferenceConfig(**base, refine_timestep_shift=0.5)
    assert float(same.dynamic().refine_shift) == same.timestep_shift
    keys = irg_loop.row_keys_for(0, [0, 1])
    inputs = _inputs(cfg, [[40, 41], [7, 8]])
    a1, a2 = irg_loop.as_host(program(same.static(), same.dynamic(), *inputs, keys))
    b1, b2 = irg_loop.as_host(program(other.static(), other.dynamic(), *inputs, keys))
    np.testing.assert_array_equal(a1["latents"], b1["latents"])
    assert np.abs(a2["latents"] - b2["latents"]).max() > 1e-3
