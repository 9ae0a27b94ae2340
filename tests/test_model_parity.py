"""Parity with the official PyTorch BAGEL on the tiny random checkpoint (tests/fixtures/bagel_tiny).

Every size is read from the fixture's json files (``from_bagel_dir``), never assumed.
Reference A: training forward (embeddings, per-layer activations, logits, velocities,
gradients); Reference B: KV-cache prefill, greedy decode, the three CFG branch velocities;
Reference D: RoPE, sin-cos tables, timestep embedding, the dense mask example.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from irg_jax.data import packed_batch as pb
from irg_jax.model import attention, config as model_config, kv_cache
from irg_jax.model.attention import TokenMeta
from irg_jax.model.bagel import gather_latent_tokens
from irg_jax.convert.bagel_keys import bagel_to_params, load_bagel, params_to_bagel
from irg_jax.model.decoder import rope_tables
from irg_jax.data.transforms import patchify
from irg_jax.train import loss as loss_lib
from _official_pack import pack_from_official


def assert_close(name, ours, ref, tol=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= tol * scale, f"{name}: max abs error {err:.3e} > {tol * scale:.3e}"


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    folder = fixtures_dir / "bagel_tiny"
    cfg = model_config.from_bagel_dir(folder)
    tensors = load_file(str(folder / "ema.safetensors"))
    return folder, cfg, tensors, load_bagel(tensors, cfg)


def latent_from_moments(moments, noise, ae_cfg):
    """The official scaled posterior sample from saved moments and noise (NCHW -> NHWC)."""
    z = moments.shape[1] // 2
    lat = ae_cfg.scale_factor * (moments[:, :z] + np.exp(0.5 * moments[:, z:]) * noise - ae_cfg.shift_factor)
    return np.transpose(lat, (0, 2, 3, 1))


@pytest.fixture(scope="module")
def ref_a(tiny):
    folder, cfg, _, _ = tiny
    ref = dict(np.load(folder / "ref_a_train.npz"))
    plan = json.loads((folder / "ref_a_train_plan.json").read_text())
    splits = [s["split_lens"] for s in plan["samples"]]
    modes = [s["attn_modes"] for s in plan["samples"]]
    px = cfg.autoencoder.downsample * cfg.latent.patch_size
    exact = pack_from_official(ref, splits, modes, timestep_shift=cfg.latent.timestep_shift,
                               pixels_per_token=px)[1]
    # extra padding in every budget exercises padding tokens, ViT rows and CE rows
    import dataclasses
    budgets = dataclasses.replace(exact, und_len=exact.und_len + 3, gen_len=exact.gen_len + 2,
                                  vit_len=exact.vit_len + 2, ce_len=exact.ce_len + 3)
    pack, budgets, storage = pack_from_official(ref, splits, modes, timestep_shift=cfg.latent.timestep_shift,
                                                pixels_per_token=px, budgets=budgets)
    tokens = patchify(np.transpose(ref["padded_latent"], (0, 2, 3, 1)), cfg.latent.patch_size)
    tokens = tokens.reshape(1, -1, tokens.shape[-1])
    x0 = gather_latent_tokens(jnp.asarray(tokens), jnp.asarray(pack["latent_src"])[None])
    g = len(ref["packed_vae_token_indexes"])
    noise = np.zeros((1, budgets.gen_len, ref["noise"].shape[-1]), np.float32)
    noise[0, :g] = ref["noise"]
    batch = jax.tree.map(lambda a: jnp.asarray(a)[None], pack)
    return ref, batch, budgets, storage, x0, jnp.asarray(noise)


def test_config_read_from_json(tiny):
    folder, cfg, _, _ = tiny
    llm = json.loads((folder / "llm_config.json").read_text())
    vit = json.loads((folder / "vit_config.json").read_text())
    assert cfg.llm.hidden_size == llm["hidden_size"] and cfg.llm.num_kv_heads == llm["num_key_value_heads"]
    assert cfg.vit.num_layers == vit["num_hidden_layers"] - 1


def test_rope_tables_and_fixed_tables(tiny):
    folder, cfg, _, model = tiny
    ref = np.load(folder / "ref_d_tables.npz")
    cos, sin = rope_tables(jnp.asarray(ref["rope_positions"])[None], cfg.llm.head_dim, cfg.llm.rope_theta)
    assert_close("rope_cos", cos[0], ref["rope_cos"], 1e-5)
    assert_close("rope_sin", sin[0], ref["rope_sin"], 1e-5)
    assert_close("latent table", model.latent_pos_table[...], ref["latent_pos_embed_table"], 1e-6)
    assert_close("vit table", model.vit_pos_table[...], ref["vit_pos_embed_table"], 1e-6)
    assert not isinstance(model.latent_pos_table, nnx.Param)
    assert_close("time embedder", model.time_embedder(jnp.asarray(ref["timestep_values"])),
                 ref["timestep_embedder_out"])


def test_mask_matches_official_dense_masks(tiny, ref_a):
    folder, *_ = tiny
    ref, batch, _, storage, *_ = ref_a
    meta = TokenMeta(batch["doc_id"], batch["split_id"], batch["split_mode"], batch["seq_pos"])
    allowed = np.asarray(attention.allowed_mask(meta, meta)[0])[np.ix_(storage, storage)]
    start = 0
    for i, n in enumerate(ref["sample_lens"]):
        official = ref[f"nested_attention_mask_{i}"] == 0
        np.testing.assert_array_equal(allowed[start:start + n, start:start + n], official)
        assert not allowed[start:start + n, :start].any() and not allowed[start:start + n, start + n:].any()
        start += n
    d = np.load(folder / "ref_d_tables.npz")
    lens = d["mask_example_split_lens"]
    modes = [pb.CAUSAL, pb.FULL, pb.CAUSAL, pb.NOISE, pb.FULL, pb.CAUSAL]
    n = int(lens.sum())
    ex = TokenMeta(*(jnp.asarray(a, jnp.int32)[None] for a in (
        np.zeros(n), np.repeat(np.arange(len(lens)), lens), np.repeat(modes, lens), np.arange(n))))
    np.testing.assert_array_equal(np.asarray(attention.allowed_mask(ex, ex)[0]), d["mask_example"] == 0)


def test_training_forward_parity(tiny, ref_a):
    _, cfg, _, model = tiny
    ref, batch, budgets, storage, x0, noise = ref_a
    g = len(ref["packed_vae_token_indexes"])
    nce = len(ref["ce_loss_indexes"])
    assert_close("latent_t", batch["latent_t"][0, :g], ref["packed_timesteps_shifted"], 1e-6)
    assert_close("x0", x0[0, :g], ref["packed_latent_clean"], 1e-6)
    out = nnx.jit(lambda m, b, x, e: m(b, x, e, collect_layer_outputs=True))(model, batch, x0, noise)
    assert_close("llm_input_sequence", out["llm_input"][0][storage], ref["llm_input_sequence"])
    for i in range(cfg.llm.num_layers):
        assert_close(f"layer{i}_out", out["layer_outputs"][i, 0][storage], ref[f"layer{i}_out"])
    assert_close("last_hidden_state", out["hidden"][0][storage], ref["last_hidden_state"])
    assert_close("logits_ce", out["ce_logits"][0, :nce], ref["logits_ce"])
    noisy = np.asarray(batch["latent_noisy"][0])
    assert_close("v_pred", out["velocity"][0][noisy], ref["v_pred"])
    assert_close("target_velocity_all", out["target"][0, :g], ref["target_velocity_all"])

    vit_n = len(ref["packed_vit_token_indexes"])
    vit_out = model.vit(batch["vit_patches"], batch["vit_pos_ids"], batch["vit_image_id"])[0, :vit_n]
    assert_close("vit_out", vit_out, ref["vit_out"])
    assert_close("connector_out", model.connector(vit_out), ref["connector_out"])
    assert_close("time_embed", model.time_embedder(batch["latent_t"][0, :g]), ref["time_embed"])


def _loss(model, batch, x0, noise):
    """The training loss (``irg_jax.train.loss``: CE and MSE sums over their token counts), weights 1."""
    out = model(batch, x0, noise)
    n_ce, n_mse = loss_lib.token_counts(batch)
    ce = loss_lib.ce_sum(out["ce_logits"], batch["ce_labels"], batch["ce_valid"]) / n_ce
    return ce + loss_lib.mse_sum(out["velocity"], out["target"], batch["latent_noisy"]) / n_mse


def _grads(model, batch, x0, noise):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, rest):
        return jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p, rest), batch, x0, noise))(params)

    return step(params, rest)


def test_training_gradients_parity(tiny, ref_a):
    _, cfg, _, model = tiny
    ref, batch, _, _, x0, noise = ref_a
    loss, grads = _grads(model, batch, x0, noise)
    assert_close("loss", loss, ref["loss"][0])
    named = params_to_bagel(grads, cfg)
    keys = [k for k in ref if k.startswith("grad.")]
    assert keys
    for k in keys:
        assert_close(k, named[k[len("grad."):]], ref[k])


def test_scan_and_remat_match_and_roundtrip_keys(tiny, ref_a):
    """Scan-over-layers + remat gives the same loss and gradients; the key mapping round-trips."""
    _, cfg, tensors, _ = tiny
    ref, batch, _, _, x0, noise = ref_a
    scan_cfg = cfg.copy_and_resolve_references()
    scan_cfg.scan_layers, scan_cfg.remat = True, True
    scan_cfg.attention.block_q, scan_cfg.attention.block_k = 16, 32  # several blocks, a ragged last one
    model = load_bagel(tensors, scan_cfg)
    assert model.decoder.layers.und.q_proj.kernel.shape[0] == cfg.llm.num_layers
    loss, grads = _grads(model, batch, x0, noise)
    assert_close("loss", loss, ref["loss"][0])
    named = params_to_bagel(grads, scan_cfg)
    for k in ("language_model.model.layers.0.self_attn.q_proj_moe_gen.weight",
              "language_model.model.layers.1.mlp.down_proj.weight"):
        assert_close(k, named[k], ref["grad." + k])
    # the cached path runs the stacked layers too
    ids = jnp.asarray([[cfg.special_ids.bos, 5, 6, 7, cfg.special_ids.eos]], jnp.int32)
    scan_cache, scan_hidden = nnx.jit(kv_cache.append_text)(model, kv_cache.init_cache(scan_cfg, 1, 8), ids)
    loop_cache, loop_hidden = nnx.jit(kv_cache.append_text)(tiny[3], kv_cache.init_cache(cfg, 1, 8), ids)
    assert_close("cached hidden (scan)", scan_hidden, loop_hidden, 1e-5)
    assert_close("cached keys (scan)", scan_cache.keys, loop_cache.keys, 1e-5)
    back = params_to_bagel(bagel_to_params(tensors, scan_cfg), scan_cfg, include_tables=True)
    assert sorted(back) == sorted(tensors)
    for k in tensors:
        np.testing.assert_allclose(back[k], tensors[k], rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("policy,per_save", [("dots_saveable", 1), ("nothing_saveable", 1), ("nothing_saveable", 2)])
def test_remat_policies_and_token_chunks_keep_the_gradients(tiny, ref_a, policy, per_save):
    """Each remat policy, with the MLP chunked over tokens (ragged last chunk), gives the same gradients;
    so does saving one decoder-layer input per two layers."""
    _, cfg, tensors, _ = tiny
    ref, batch, _, _, x0, noise = ref_a
    chunk_cfg = cfg.copy_and_resolve_references()
    chunk_cfg.scan_layers, chunk_cfg.remat, chunk_cfg.remat_policy = True, True, policy
    chunk_cfg.mlp_chunk, chunk_cfg.layers_per_save = 24, per_save
    assert cfg.llm.num_layers % per_save == 0
    model = load_bagel(tensors, chunk_cfg)
    loss, grads = _grads(model, batch, x0, noise)
    assert_close("loss", loss, ref["loss"][0])
    named = params_to_bagel(grads, chunk_cfg)
    for k in ("language_model.model.layers.1.mlp_moe_gen.down_proj.weight",
              "language_model.model.layers.0.self_attn.q_proj.weight",
              "vit_model.vision_model.embeddings.patch_embedding.weight"):
        assert_close(k, named[k], ref["grad." + k])


def test_key_mapping_reports_problems(tiny):
    _, cfg, tensors, _ = tiny
    broken = dict(tensors)
    del broken["language_model.model.layers.1.mlp_moe_gen.up_proj.weight"]
    broken["language_model.model.extra.weight"] = np.zeros(3, np.float32)
    broken["vae2llm.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError) as e:
        bagel_to_params(broken, cfg)
    msg = str(e.value)
    assert "language_model.model.extra.weight" in msg
    assert "decoder/layers/1/gen/mlp/up_proj/kernel" in msg
    assert "vae2llm.weight -> vae2llm/kernel" in msg


def test_inference_parity(tiny):
    """Replays the plan's prefill steps on two cache rows: 'cond' (row 0) and 'img_uncond' (row 1).

    Each step runs on its context's row while the other row sits out; snapshots of the
    conditional row give the text-unconditional and generation contexts.
    """
    folder, cfg, _, model = tiny
    ref = dict(np.load(folder / "ref_b_infer.npz"))
    plan = json.loads((folder / "ref_b_infer_plan.json").read_text())
    rows = {"cond": 0, "img_uncond": 1}
    texts, ids = plan["texts"], cfg.special_ids
    width = max(len(t) for t in texts.values()) + 2  # one padded width: one compilation for all texts
    contexts = plan["contexts"]
    n_gen = len(ref["gen_text_argmax"])
    capacity = max(c["kv_lens"][0] for c in contexts.values()) + n_gen + 8
    append_text = nnx.jit(kv_cache.append_text)
    append_vae = nnx.jit(kv_cache.append_vae_image)
    append_vit = nnx.jit(kv_cache.append_vit_image)
    both = lambda a: jnp.asarray(np.repeat(np.asarray(a)[None], 2, 0))  # noqa: E731

    cache = kv_cache.init_cache(cfg, 2, capacity)
    segments = {0: [], 1: []}
    snapshots = {}
    for step in plan["steps"]:
        row, nn = rows[step["context"]], f"prefill{step['step']:02d}_"
        active = jnp.asarray([r == row for r in range(2)])
        if step["kind"] == "text":
            seq = [ids.bos] + texts[step["input"]] + [ids.eos]
            arr = np.zeros((2, width), np.int32)
            arr[row, :len(seq)] = seq
            cache, _ = append_text(model, cache, jnp.asarray(arr), jnp.asarray(active * len(seq), jnp.int32))
            segments[row].append(step["input"])
        elif step["kind"] == "vae_image":
            key = step["input"]
            lat = patchify(latent_from_moments(ref[f"{key}_vae_moments"], ref[f"{key}_vae_posterior_noise"],
                                                       cfg.autoencoder), cfg.latent.patch_size)
            cache = append_vae(model, cache, both(lat[0]), both(ref[nn + "packed_vae_position_ids"]), active)
            segments[row].append(f"{key}(VAE)")
        else:
            key = step["input"]
            cache = append_vit(model, cache, both(ref[f"{key}_vit_packed_vit_tokens"]),
                               both(ref[nn + "packed_vit_position_ids"]), active)
            segments[row].append(f"{key}(ViT)")
        assert int(cache.length[row]) == step["kv_lens_after"][0] and int(cache.rope[row]) == step["ropes_after"][0]
        snapshots[(row, tuple(segments[row]))] = cache

    for row, ctx, prefix in ((0, "cond_final", "kv_cond"), (1, "img_uncond_turn2", "kv_img_uncond")):
        n = contexts[ctx]["kv_lens"][0]
        assert tuple(segments[row]) == tuple(contexts[ctx]["segments"])
        for layer in range(cfg.llm.num_layers):
            assert_close(f"{prefix}_layer{layer}_key", cache.keys[layer, row, :n], ref[f"{prefix}_layer{layer}_key"])
            assert_close(f"{prefix}_layer{layer}_value", cache.values[layer, row, :n],
                         ref[f"{prefix}_layer{layer}_value"])

    # greedy text generation (only row 0 is active)
    decode = nnx.jit(kv_cache.decode_step)
    start = snapshots[(0, tuple(plan["gen_text"]["context"]))]
    assert int(start.rope[0]) == int(ref["gen_text_start_position"][0])
    c, tok, logits = start, jnp.full((2,), ids.bos, jnp.int32), []
    for _ in range(n_gen):
        step_logits, c = decode(model, c, tok, jnp.asarray([True, False]))
        logits.append(step_logits[0])
        tok = jnp.argmax(step_logits, axis=-1).astype(jnp.int32)
    assert_close("gen_text_logits", jnp.stack(logits), ref["gen_text_logits"])
    np.testing.assert_array_equal(np.argmax(np.stack(logits), -1), ref["gen_text_argmax"])
    assert int(c.length[1]) == int(start.length[1])  # the inactive row is untouched

    # the three CFG branch velocities of one _forward_flow call
    query = nnx.jit(kv_cache.query_noisy_latents)
    x_t, t = both(ref["flow_x_t"]), jnp.asarray([ref["flow_timestep"][0]] * 2)
    pos = both(ref["flow_cond_packed_vae_position_ids"])
    text_uncond = snapshots[(0, tuple(contexts["text_uncond_turn2"]["segments"]))]
    assert int(cache.rope[0]) == int(ref["flow_cond_packed_position_ids"][0])
    assert int(text_uncond.rope[0]) == int(ref["flow_text_uncond_cfg_packed_position_ids"][0])
    before = cache
    v = query(model, cache, x_t, t, pos)
    assert_close("flow_v_cond", v[0], ref["flow_v_cond"])
    assert_close("flow_v_img_uncond", v[1], ref["flow_v_img_uncond"])
    assert_close("flow_v_text_uncond", query(model, text_uncond, x_t, t, pos)[0], ref["flow_v_text_uncond"])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(cache)))


def test_x0_tokens_from_autoencoder(tiny, ref_a):
    """The training loop's path: AE-encode the padded image batch, patchify, gather by latent_src."""
    from irg_jax.convert.ae_keys import load_autoencoder
    from irg_jax.model.bagel import latent_tokens

    folder, cfg, _, _ = tiny
    ref, batch, *_ = ref_a
    ae = load_autoencoder(folder / "ae.safetensors", cfg.autoencoder)
    noise = np.transpose(ref["vae_posterior_noise"], (0, 2, 3, 1))
    tokens = nnx.jit(latent_tokens, static_argnums=3)(ae, batch["vae_images"], jnp.asarray(noise),
                                                      cfg.latent.patch_size)
    x0 = gather_latent_tokens(tokens, batch["latent_src"])
    g = len(ref["packed_vae_token_indexes"])
    assert_close("packed_latent_clean", x0[0, :g], ref["packed_latent_clean"])


def test_bfloat16_compute_within_documented_tolerance(tiny, ref_a):
    """bf16 activations (fp32 params): per-quantity rms error within 3% of the rms (fixture README §7)."""
    _, cfg, tensors, _ = tiny
    ref, batch, _, _, x0, noise = ref_a
    bf16_cfg = cfg.copy_and_resolve_references()
    bf16_cfg.dtype = "bfloat16"
    model = load_bagel(tensors, bf16_cfg)
    assert model.decoder.lm_head.kernel[...].dtype == jnp.float32
    out = nnx.jit(lambda m, b, x, e: m(b, x, e))(model, batch, x0, noise)
    nce = len(ref["ce_loss_indexes"])
    noisy = np.asarray(batch["latent_noisy"][0])
    for name, ours, want in (("logits_ce", out["ce_logits"][0, :nce], ref["logits_ce"]),
                             ("v_pred", out["velocity"][0][noisy], ref["v_pred"])):
        ours, want = np.asarray(ours, np.float64), np.asarray(want, np.float64)
        rel = np.sqrt(np.mean((ours - want) ** 2)) / np.sqrt(np.mean(want ** 2))
        assert 0 < rel < 0.03, f"{name}: bf16 rms error {rel:.4f} of rms"
