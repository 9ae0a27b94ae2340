"""Sharded forward = single-device forward; compiled FLOPs = analytic count; 7B parameter count."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file

from irg_jax.config import DEFAULT_RULES
from irg_jax.model import config as model_config
from irg_jax.model.bagel import forward_flops, gather_latent_tokens, param_count
from irg_jax.convert.bagel_keys import load_bagel
from irg_jax.data.transforms import patchify
from _official_pack import pack_from_official
from irg_jax.parallel.mesh import build_mesh
from irg_jax.parallel.sharding import activation_rules, replicated_fraction, state_shardings


@pytest.fixture(scope="module")
def setup(fixtures_dir):
    folder = fixtures_dir / "bagel_tiny"
    cfg = model_config.from_bagel_dir(folder)
    tensors = load_file(str(folder / "ema.safetensors"))
    ref = dict(np.load(folder / "ref_a_train.npz"))
    plan = json.loads((folder / "ref_a_train_plan.json").read_text())
    pack, budgets, _ = pack_from_official(
        ref, [s["split_lens"] for s in plan["samples"]], [s["attn_modes"] for s in plan["samples"]],
        timestep_shift=cfg.latent.timestep_shift, pixels_per_token=cfg.autoencoder.downsample * cfg.latent.patch_size)
    tokens = patchify(np.transpose(ref["padded_latent"], (0, 2, 3, 1)), cfg.latent.patch_size)
    x0 = gather_latent_tokens(jnp.asarray(tokens.reshape(1, -1, tokens.shape[-1])), jnp.asarray(pack["latent_src"])[None])
    return cfg, tensors, pack, budgets, x0, ref


def _forward(graphdef, rules):
    def fwd(state, batch, x0, noise):
        with activation_rules(rules or ()):
            return nnx.merge(graphdef, state)(batch, x0, noise)
    return fwd


def test_sharded_forward_equals_single_device(setup):
    cfg, tensors, pack, _, x0, _ = setup
    batch_size = 4
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(np.repeat(v[None], batch_size, 0)) for k, v in pack.items()}
    x0 = jnp.repeat(x0, batch_size, 0)
    noise = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)

    single = load_bagel(tensors, cfg)
    graphdef, state = nnx.split(single)
    want = jax.jit(_forward(graphdef, None))(state, batch, x0, noise)

    scan_cfg = cfg.copy_and_resolve_references()
    scan_cfg.scan_layers = True
    model = load_bagel(tensors, scan_cfg)
    graphdef, state = nnx.split(model)
    mesh = build_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = DEFAULT_RULES
    state = jax.device_put(state, state_shardings(state, mesh, rules))
    assert replicated_fraction(nnx.state(state, nnx.Param)) < 0.05
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    batch, x0, noise = jax.device_put((batch, x0, noise), batch_sharding)
    with jax.set_mesh(mesh):
        got = jax.jit(_forward(graphdef, rules))(state, batch, x0, noise)
    assert got["ce_logits"].sharding.spec[0] == ("data", "fsdp")
    for k in ("ce_logits", "velocity", "target"):
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=2e-5, rtol=1e-5, err_msg=k)


def test_compiled_flops_match_analytic_count(setup):
    """XLA's count of the forward is within 10% of the matmul count with one expert per token."""
    cfg, tensors, pack, budgets, x0, ref = setup
    model = load_bagel(tensors, cfg)
    graphdef, state = nnx.split(model)
    batch = {k: jnp.asarray(v)[None] for k, v in pack.items()}
    compiled = jax.jit(_forward(graphdef, None)).lower(state, batch, x0, x0).compile()
    xla = compiled.cost_analysis()["flops"]
    analytic = forward_flops(cfg, batch=1, und_len=budgets.und_len, gen_len=budgets.gen_len,
                             vit_len=budgets.vit_len, ce_len=budgets.ce_len)
    both_experts = analytic["total"] + analytic["llm_projections_mlp"]  # if every token ran both experts
    print(f"\nXLA forward FLOPs {xla:.4g}, analytic {analytic['total']:.4g} (ratio {xla / analytic['total']:.3f}); "
          f"both experts on every token would be {both_experts:.4g}")
    assert abs(xla / analytic["total"] - 1) < 0.10
    assert xla < 0.9 * both_experts


def test_bagel_7b_mot_parameter_count():
    n = param_count(model_config.bagel_7b_mot())
    print(f"\nbagel_7b_mot parameters (eval_shape): {n:,} ({n / 1e9:.2f}B)")
    assert 13.5e9 < n < 15.0e9


@pytest.mark.parametrize("chunk", [0, 5])
def test_vocab_parallel_chunked_ce_matches_dense(chunk):
    """The chunked, vocab-parallel CE on a 2x2x2 mesh = optax CE on one device, value and gradients."""
    import optax
    from irg_jax.model.bagel import chunked_ce_sum

    rng = np.random.default_rng(1)
    b, n, d, v = 4, 13, 16, 64  # 13 tokens in chunks of 5: a padded last chunk
    hidden = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(d, v)) / 4, jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, size=(b, n)), jnp.int32)
    valid = jnp.asarray(rng.random((b, n)) < 0.7)

    def dense(h, k):
        ce = optax.softmax_cross_entropy_with_integer_labels(jnp.einsum("bnd,dv->bnv", h, k), labels)
        return jnp.sum(jnp.where(valid, ce, 0.0))

    want, want_grads = jax.value_and_grad(dense, argnums=(0, 1))(hidden, kernel)
    mesh = build_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    h = jax.device_put(hidden, NamedSharding(mesh, P(("data", "fsdp"))))
    k = jax.device_put(kernel, NamedSharding(mesh, P("fsdp", "tensor")))

    def sharded(h, k):
        with activation_rules(DEFAULT_RULES):
            return chunked_ce_sum(h, k, labels, valid, chunk)

    with jax.set_mesh(mesh):
        got, got_grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(h, k)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for name, g, w in zip(("d hidden", "d kernel"), got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5, err_msg=name)
