"""The flow sampler and IRG's CFG: analytic fields, hand-made vectors, and the official numbers.

Reference B of tests/fixtures/bagel_tiny pins the CFG combinations (text_channel,
global, channel) on one _forward_flow call and two short generate_image runs (turn-2
style with three branches, turn-1 style with the CFG interval and global renorm).
"""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from irg_jax.inference import feedback, flow
from irg_jax.inference.irg_loop import generate_latents, prefix_view
from irg_jax.convert import ae_keys
from irg_jax.model import config as model_config, kv_cache
from irg_jax.convert.bagel_keys import load_bagel
from irg_jax.data.transforms import patchify
from irg_jax.model.kv_cache import KVCache


def assert_close(name, ours, ref, tol=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    err = float(np.abs(ours - ref).max())
    assert err <= tol * max(1.0, float(np.abs(ref).max())), f"{name}: max abs error {err:.3e}"


# ---------------------------------------------------------------------------- schedule and ODE

def test_schedule_matches_reference_values():
    np.testing.assert_allclose(flow.timesteps(5, 3.0), [1, 0.9, 0.75, 0.5, 0], atol=1e-6)
    np.testing.assert_allclose(flow.timesteps(8, 3.0)[:-1],
                               [1, .947368, .882353, .8, .692308, .545455, .333333], atol=1e-6)
    np.testing.assert_allclose(flow.timesteps(3, 1.0), [1, 0.5, 0], atol=1e-7)  # shift 1 = plain linspace
    with pytest.raises(ValueError, match="num_steps"):
        flow.timesteps(1, 3.0)


def _run(velocity, x1, num_steps, shift):
    return jax.jit(lambda x: flow.sample(x, num_steps=num_steps, shift=shift, num_branches=1,
                                         velocity_all=velocity))(x1)


def test_sampler_recovers_a_point_target_exactly():
    """v(x, t) = (x - x0) / t is the rectified-flow field of a point target x0: Euler is exact
    on any schedule, so the sampler must land on x0."""
    x0 = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3)), jnp.float32)
    x1 = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 3)), jnp.float32)
    out = _run(lambda x, t: (x - x0) / t[:, None, None], x1, 7, 3.0)
    np.testing.assert_allclose(out, x0, atol=1e-5)


def test_a_late_start_integrates_from_t_start_on_the_scaled_schedule():
    """Started at t = s from s*noise + (1-s)*x0 (turn 2 restarting image 1), the point-target field
    still lands on x0, the first step is at t = s, and s = 1 is the default schedule."""
    x0 = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3)), jnp.float32)
    x1 = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 3)), jnp.float32)
    velocity = lambda x, t: (x - x0) / t[:, None, None]  # noqa: E731

    def run(s):
        return flow.sample(s * x1 + (1 - s) * x0, num_steps=6, shift=3.0, num_branches=1, velocity_all=velocity,
                           record=True, t_start=s)

    out, traj = jax.jit(run)(0.6)
    np.testing.assert_allclose(out, x0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(traj.t), 0.6 * np.asarray(flow.timesteps(6, 3.0))[:-1], rtol=1e-6)
    np.testing.assert_allclose(jax.jit(run)(1.0)[0], _run(velocity, x1, 6, 3.0), atol=1e-6)
    from irg_jax.inference.irg_loop import InferenceConfig
    with pytest.raises(ValueError, match="refine_start"):
        InferenceConfig(refine_start=0.0)


def test_sampler_integrates_the_gaussian_flow():
    """Data N(m, s^2), noise N(0, 1): the flow ODE maps eps to m + s eps. Its velocity is
    E[eps - x0 | x_t] = -m + (t - (1-t) s^2) / ((1-t)^2 s^2 + t^2) (x - (1-t) m)."""
    m, s = 1.5, 0.5

    def velocity(x, t):
        t = t[:, None, None]
        return -m + (t - (1 - t) * s ** 2) / ((1 - t) ** 2 * s ** 2 + t ** 2) * (x - (1 - t) * m)

    eps = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4, 2)), jnp.float32)
    out = _run(velocity, eps, 400, 1.0)
    np.testing.assert_allclose(out, m + s * eps, atol=5e-3)
    coarse = _run(velocity, eps, 4, 1.0)
    assert np.abs(np.asarray(coarse) - (m + s * eps)).max() > 1e-2  # the test can tell steps apart


# ---------------------------------------------------------------------------- CFG on hand-made vectors

V_C = np.array([[[3.0, 4.0], [0.0, 1.0]]], np.float32)     # token norms 5 and 1; total sqrt(26)
V_TU = np.array([[[1.0, 0.0], [0.0, -1.0]]], np.float32)
V_IU = np.zeros_like(V_C)
# v_t' = v_tu + 3 (v_c - v_tu) = [[7, 12], [0, 5]]: token norms sqrt(193) and 5; total sqrt(218)


def test_cfg_channel_renorm_caps_each_token():
    v = flow.combine_guidance(V_C, V_TU, None, 3.0, 1.0, "channel")
    np.testing.assert_allclose(v, [[[7 * 5 / math.sqrt(193), 12 * 5 / math.sqrt(193)], [0, 1]]], rtol=1e-6)


def test_cfg_global_renorm_uses_one_norm_per_image():
    v = flow.combine_guidance(V_C, V_TU, None, 3.0, 1.0, "global")
    r = math.sqrt(26 / 218)
    np.testing.assert_allclose(v, [[[7 * r, 12 * r], [0, 5 * r]]], rtol=1e-6)
    # per image: a second row with a 10x larger field has the same factor
    both = flow.combine_guidance(np.concatenate([V_C, 10 * V_C]), np.concatenate([V_TU, 10 * V_TU]), None, 3.0,
                                 1.0, "global")
    np.testing.assert_allclose(both[1], 10 * np.asarray(both[0]), rtol=1e-6)


def test_cfg_text_channel_renorms_text_guidance_before_image_guidance():
    v = flow.combine_guidance(V_C, V_TU, V_IU, 3.0, 2.0, "text_channel")
    # v_t = [[7,12]*5/sqrt(193), [0,1]], then v = 0 + 2 (v_t - 0)
    np.testing.assert_allclose(v, [[[70 / math.sqrt(193), 120 / math.sqrt(193)], [0, 2]]], rtol=1e-6)
    # image scale <= 1: no image guidance at all
    v1 = flow.combine_guidance(V_C, V_TU, V_IU + 100.0, 3.0, 1.0, "text_channel")
    np.testing.assert_allclose(v1, [[[35 / math.sqrt(193), 60 / math.sqrt(193)], [0, 1]]], rtol=1e-6)


def test_cfg_image_guidance_then_global_renorm_and_clamps():
    # global with image guidance: v' = v_iu + 2 (v_t' - v_iu) = [[14, 24], [0, 10]], norm sqrt(872)
    v = flow.combine_guidance(V_C, V_TU, V_IU, 3.0, 2.0, "global")
    r = math.sqrt(26 / 872)
    np.testing.assert_allclose(v, [[[14 * r, 24 * r], [0, 10 * r]]], rtol=1e-6)
    # renorm_min raises the factor; it never exceeds 1 (a shrinking guidance is left alone)
    v_min = flow.combine_guidance(V_C, V_TU, None, 3.0, 1.0, "channel", renorm_min=0.5)
    np.testing.assert_allclose(v_min, [[[3.5, 6.0], [0, 2.5]]], rtol=1e-6)  # both factors < 0.5
    shrink = flow.combine_guidance(V_C, V_C * 2, None, 1.5, 1.0, "channel")  # v' = 0.5 v_c: factor capped at 1
    np.testing.assert_allclose(shrink, 0.5 * V_C, rtol=1e-6)
    with pytest.raises(ValueError, match="renorm"):
        flow.combine_guidance(V_C, V_TU, None, 3.0, 1.0, "bogus")


def test_cfg_interval_and_branch_skipping():
    """Guidance only when lo < t <= hi and the text scale > 1; other steps use v_cond alone."""
    x1 = jnp.ones((1, 2, 2), jnp.float32)

    def velocity_all(x, t):  # branches [cond | text-uncond]: cond = 1, uncond = 0
        return jnp.concatenate([jnp.ones_like(x[:1]), jnp.zeros_like(x[1:])])

    def run(scale, lo):
        g = flow.Guidance.make(scale, 1.0, (lo, 1.0))
        return flow.sample(x1, num_steps=5, shift=1.0, num_branches=2, velocity_all=velocity_all,
                           velocity_cond=lambda x, t: jnp.ones_like(x), guidance=g, renorm_type="channel",
                           record=True)[1]

    traj = jax.jit(run)(3.0, 0.4)  # t = 1, .75, .5, .25: the last step is outside (0.4, 1]
    np.testing.assert_array_equal(traj.guided[:, 0], [True, True, True, False])
    # the guided velocity is v_c scaled by 3 and renormed back to |v_c|: 1 everywhere
    np.testing.assert_allclose(traj.velocity, 1.0, rtol=1e-6)
    assert not np.asarray(jax.jit(run)(1.0, 0.0).guided).any()  # text scale 1: never guided


# ---------------------------------------------------------------------------- official numbers

@pytest.fixture(scope="module")
def ref(fixtures_dir):
    folder = fixtures_dir / "bagel_tiny"
    return folder, dict(np.load(folder / "ref_b_infer.npz")), json.loads((folder / "ref_b_infer_plan.json").read_text())


def test_cfg_combinations_match_official(ref):
    _, r, _ = ref
    v_c, v_tu, v_iu = (r[k][None] for k in ("flow_v_cond", "flow_v_text_uncond", "flow_v_img_uncond"))
    for renorm in ("text_channel", "global", "channel"):
        got = flow.combine_guidance(v_c, v_tu, v_iu, 4.0, 2.0, renorm, 0.0)
        assert_close(f"flow_v_{renorm}", got[0], r[f"flow_v_{renorm}"], tol=1e-5)


def _replay_contexts(model, cfg, r, plan):
    """The plan's prefill steps on two rows: 0 = cond, 1 = img_uncond (as in the parity test)."""
    ids, texts = cfg.special_ids, plan["texts"]
    width = max(len(t) for t in texts.values()) + 2
    cache = kv_cache.init_cache(cfg, 2, 48)
    append_text, append_vae, append_vit = (nnx.jit(f) for f in (kv_cache.append_text, kv_cache.append_vae_image,
                                                               kv_cache.append_vit_image))
    both = lambda a: jnp.asarray(np.repeat(np.asarray(a)[None], 2, 0))  # noqa: E731
    for step in plan["steps"]:
        row, nn = {"cond": 0, "img_uncond": 1}[step["context"]], f"prefill{step['step']:02d}_"
        active = jnp.asarray([i == row for i in range(2)])
        if step["kind"] == "text":
            seq = [ids.bos] + texts[step["input"]] + [ids.eos]
            arr = np.zeros((2, width), np.int32)
            arr[row, :len(seq)] = seq
            cache, _ = append_text(model, cache, jnp.asarray(arr), jnp.asarray(active * len(seq), jnp.int32))
        elif step["kind"] == "vae_image":
            m, n = r["I1_vae_moments"], r["I1_vae_posterior_noise"]
            z = cfg.autoencoder.scale_factor * (m[:, :16] + np.exp(0.5 * m[:, 16:]) * n - cfg.autoencoder.shift_factor)
            lat = patchify(np.transpose(z, (0, 2, 3, 1)), cfg.latent.patch_size)
            cache = append_vae(model, cache, both(lat[0]), both(r[nn + "packed_vae_position_ids"]), active)
        else:
            cache = append_vit(model, cache, both(r["I1_vit_packed_vit_tokens"]),
                               both(r[nn + "packed_vit_position_ids"]), active)
        assert int(cache.length[row]) == step["kv_lens_after"][0]
    row = lambda i: KVCache(cache.keys[:, i:i + 1], cache.values[:, i:i + 1], cache.length[i:i + 1],  # noqa: E731
                            cache.rope[i:i + 1])
    return row(0), row(1)


def _prefix(cache, n, rope):
    return prefix_view(cache, jnp.asarray([n], jnp.int32), jnp.asarray([rope], jnp.int32))


def test_generate_image_matches_official(ref):
    folder, r, plan = ref
    cfg = model_config.from_bagel_dir(folder)
    model = load_bagel(load_file(str(folder / "ema.safetensors")), cfg)
    ae = ae_keys.load_autoencoder(folder / "ae.safetensors", cfg.autoencoder)
    cond, img_uncond = _replay_contexts(model, cfg, r, plan)
    assert int(img_uncond.length[0]) == 26 and int(cond.length[0]) == 38
    graph, state = nnx.split(model)

    @jax.jit(static_argnames=("n_steps", "renorm"))
    def run(state, branches, noise, pos, guidance, n_steps, renorm):
        m = nnx.merge(graph, state)
        return generate_latents(m, branches, noise, pos, num_steps=n_steps, shift=3.0, guidance=guidance,
                                renorm_type=renorm, record=True)

    # turn-2 style: cond, text-uncond = cond without T2 (31 rows, rope 21), img-uncond; text_channel
    branches = [cond, _prefix(cond, 31, 21), img_uncond]
    x, traj = run(state, branches, jnp.asarray(r["gen2_init_noise"])[None],
                  jnp.asarray(r["flow_cond_packed_vae_position_ids"])[None], flow.Guidance.make(4.0, 2.0, (0.0, 1.0)), 5, "text_channel")
    assert_close("gen2_step_t", traj.t, r["gen2_step_t"], 1e-6)
    assert_close("gen2_step_x_t", traj.x_t[:, 0], r["gen2_step_x_t"])
    assert_close("gen2_step_v", traj.velocity[:, 0], r["gen2_step_v"])
    assert_close("gen2_final_latent", x[0], r["gen2_final_latent"])
    grid = feedback.image_grid(cfg, 32, 32)
    decoded = feedback.decode_latents(ae, x, grid, cfg)
    assert_close("gen2_decoded_float", np.transpose(decoded, (0, 3, 1, 2)), r["gen2_decoded_float"])
    u8 = np.asarray(feedback.to_uint8(decoded))[0].astype(int)
    assert np.abs(u8 - r["gen2_decoded_uint8"]).max() <= 1 and (u8 == r["gen2_decoded_uint8"]).mean() > 0.99

    # turn-1 style: cond [SYS, P, T1] (19 rows), text-uncond [SYS] (8 rows); interval (0.4, 1], global
    branches = [_prefix(cond, 19, 19), _prefix(cond, 8, 8)]
    x, traj = run(state, branches, jnp.asarray(r["gen1_init_noise"])[None],
                  jnp.asarray(r["gen1_cond_packed_vae_position_ids"])[None], flow.Guidance.make(4.0, 1.0, (0.4, 1.0)), 8, "global")
    np.testing.assert_array_equal(np.where(traj.guided[:, 0], 4.0, 1.0), r["gen1_step_cfg_text_scale"])
    assert_close("gen1_step_v", traj.velocity[:, 0], r["gen1_step_v"])
    assert_close("gen1_final_latent", x[0], r["gen1_final_latent"])
    decoded = feedback.decode_latents(ae, x, feedback.image_grid(cfg, 32, 48), cfg)
    assert_close("gen1_decoded_float", np.transpose(decoded, (0, 3, 1, 2)), r["gen1_decoded_float"])
