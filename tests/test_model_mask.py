"""The packed attention mask (spec §2.5) and the blockwise attention kernel."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from irg_jax.data.packed_batch import CAUSAL, FULL, NOISE, PAD_DOC
from irg_jax.model import attention
from irg_jax.model.attention import TokenMeta

# (document, mode, length); a list per pack. Padding is its own causal document.
PACK = [
    (0, CAUSAL, 4),   # 0 text
    (0, FULL, 5),     # 1 ViT image (with markers)
    (0, CAUSAL, 3),   # 2 text
    (0, NOISE, 4),    # 3 noisy VAE target
    (0, FULL, 4),     # 4 its clean copy
    (0, CAUSAL, 3),   # 5 text
    (1, CAUSAL, 3),   # 6 second document: text
    (1, FULL, 3),     # 7 clean VAE image
    (1, CAUSAL, 2),   # 8 text
    (PAD_DOC, CAUSAL, 5),  # 9 padding
]


def build_meta(segments, order=None):
    doc, split, mode = [], [], []
    for i, (d, m, n) in enumerate(segments):
        doc += [d] * n
        split += [i] * n
        mode += [m] * n
    pos = np.arange(len(doc))
    arrays = [np.asarray(a) for a in (doc, split, mode, pos)]
    if order is not None:
        arrays = [a[order] for a in arrays]
    return TokenMeta(*(jnp.asarray(a, jnp.int32)[None] for a in arrays))


def expected_mask(segments):
    """Built segment by segment from the consequences listed in spec §2.5."""
    bounds = np.cumsum([0] + [n for *_, n in segments])
    total = bounds[-1]
    out = np.zeros((total, total), bool)
    for qi, (qd, qm, _) in enumerate(segments):
        q0, q1 = bounds[qi], bounds[qi + 1]
        for ki, (kd, km, _) in enumerate(segments):
            k0, k1 = bounds[ki], bounds[ki + 1]
            if qd != kd or ki > qi:
                continue  # other documents and later splits are never visible
            if ki < qi:
                out[q0:q1, k0:k1] = km != NOISE  # earlier splits, unless noisy
            elif qm == CAUSAL:
                out[q0:q1, k0:k1] = np.tril(np.ones((q1 - q0, k1 - k0), bool))
            else:
                out[q0:q1, k0:k1] = True  # an image sees itself bidirectionally
    return out


def test_mask_rule_on_hand_built_pack():
    want = expected_mask(PACK)
    got = np.asarray(attention.allowed_mask(build_meta(PACK), build_meta(PACK))[0])
    np.testing.assert_array_equal(got, want)
    # spot checks of the conventions that are easy to get wrong
    noisy, clean, later_text = slice(12, 16), slice(16, 20), slice(20, 23)
    assert got[noisy, noisy].all() and got[noisy, :12].all()
    assert not got[clean, noisy].any() and not got[later_text, noisy].any()
    assert got[clean, clean].all() and got[later_text, clean].all()
    assert not got[23:, :23].any() and not got[:23, 23:].any()  # documents are isolated
    assert (got[-5:, -5:] == np.tril(np.ones((5, 5), bool))).all()  # padding: its own causal document


def test_mask_follows_logical_order_not_storage_order():
    """Expert-sorted storage ([und | gen]) gives the permuted mask of the logical pack."""
    total = sum(n for *_, n in PACK)
    gen = set(range(12, 20)) | set(range(26, 29))  # VAE images of both documents
    order = np.array([i for i in range(total) if i not in gen] + sorted(gen))
    meta = build_meta(PACK, order)
    got = np.asarray(attention.allowed_mask(meta, meta)[0])
    np.testing.assert_array_equal(got, expected_mask(PACK)[np.ix_(order, order)])


def _random_qkv(rng, b, lq, lk, hq, hk, d):
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return f(b, lq, hq, d), f(b, lk, hk, d), f(b, lk, hk, d)


@pytest.mark.parametrize("block_q, block_k", [(8, 8), (5, 16), (64, 64)])
def test_chunked_equals_dense_forward_and_grad(block_q, block_k):
    rng = np.random.default_rng(0)
    total = sum(n for *_, n in PACK)
    order = rng.permutation(total)
    meta = build_meta(PACK, order)
    meta = TokenMeta(*(jnp.concatenate([a, a], 0) for a in meta))  # batch of 2
    q, k, v = _random_qkv(rng, 2, total, total, 4, 2, 8)
    weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, meta, meta, block_q=block_q, block_k=block_k) * weights)

    dense = attention.dense_attention(q, k, v, meta, meta)
    chunked = jax.jit(attention.chunked_attention, static_argnames=("block_q", "block_k"))(
        q, k, v, meta, meta, block_q=block_q, block_k=block_k)
    np.testing.assert_allclose(chunked, dense, atol=2e-6, rtol=1e-5)
    g_dense = jax.jit(jax.grad(loss(attention.dense_attention), argnums=(0, 1, 2)))(q, k, v)
    g_chunk = jax.jit(jax.grad(loss(attention.chunked_attention), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", g_chunk, g_dense):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_queries_with_no_visible_key_give_zeros():
    rng = np.random.default_rng(1)
    q, k, v = _random_qkv(rng, 1, 4, 6, 2, 1, 8)
    qm = TokenMeta(*(jnp.asarray(a, jnp.int32)[None] for a in ([0, 0, 7, 7], [0, 0, 0, 0], [1] * 4, [6, 7, 8, 9])))
    km = TokenMeta(*(jnp.asarray(a, jnp.int32)[None] for a in ([0] * 5 + [attention.INVALID_DOC], [-1] * 6,
                                                              [1] * 6, range(6))))
    out = jax.jit(lambda *a: attention.chunked_attention(*a, block_q=2, block_k=4))(q, k, v, qm, km)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(np.asarray(out[0, 2:]), 0.0)
    np.testing.assert_allclose(out[:, :2], attention.dense_attention(q, k, v, qm, km)[:, :2], atol=1e-6)


def _max_intermediate_size(jaxpr) -> int:
    biggest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(var.aval, "shape", ()))))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    biggest = max(biggest, _max_intermediate_size(getattr(inner, "jaxpr", inner)))
    return biggest


def test_chunked_never_builds_a_sequence_squared_array():
    L, block = 2048, 128
    meta = TokenMeta(*(jnp.zeros((1, L), jnp.int32) for _ in range(3)), jnp.arange(L, dtype=jnp.int32)[None])
    q = k = v = jnp.zeros((1, L, 1, 8), jnp.float32)

    def fwd_bwd(q, k, v):
        return jax.grad(lambda q: attention.chunked_attention(q, k, v, meta, meta, block_q=block,
                                                              block_k=block).sum())(q)

    jaxpr = jax.make_jaxpr(fwd_bwd)(q, k, v).jaxpr
    # q/k/v-sized arrays, and the tile lists' mask of one query block against all keys (block x L)
    assert _max_intermediate_size(jaxpr) <= max(4 * L * 8 + block * block * 4, block * L)
    dense_jaxpr = jax.make_jaxpr(lambda q, k, v: attention.dense_attention(q, k, v, meta, meta))(q, k, v).jaxpr
    assert _max_intermediate_size(dense_jaxpr) >= L * L  # the walker does see L x L arrays


def test_registry_dispatch_and_errors():
    calls = []

    @attention.register("test_spy")
    def spy(q, k, v, qm, km, *, block_q, block_k):
        calls.append((block_q, block_k))
        return attention.dense_attention(q, k, v, qm, km)

    cfg = ml_collections.ConfigDict({"impl": "test_spy", "block_q": 3, "block_k": 7})
    rng = np.random.default_rng(2)
    q, k, v = _random_qkv(rng, 1, 5, 5, 2, 2, 4)
    meta = build_meta([(0, CAUSAL, 5)])
    attention.attend(q, k, v, meta, meta, cfg)
    assert calls == [(3, 7)]
    with pytest.raises(ValueError, match="model.attention.impl='nope'"):
        attention.get("nope")
    with pytest.raises(ValueError, match="not a multiple"):
        attention.chunked_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), meta, meta)


def test_attend_runs_each_devices_packs_on_a_mesh():
    """On 8 devices (packs over fsdp, kv heads over tensor) ``attend`` runs ``chunked`` inside
    ``shard_map`` and gives the one-device values and gradients; the packs differ, so each
    device's tile lists (and loop trip counts) differ."""
    from jax.sharding import AxisType
    from irg_jax.parallel import sharding

    rng = np.random.default_rng(1)
    total = sum(n for *_, n in PACK)
    metas = [build_meta(PACK, rng.permutation(total) if i % 2 else None) for i in range(4)]
    meta = TokenMeta(*(jnp.concatenate(f, 0) for f in zip(*metas)))  # 4 different packs
    q, k, v = _random_qkv(rng, 4, total, total, 4, 2, 8)
    cfg = ml_collections.ConfigDict(dict(impl="chunked", block_q=8, block_k=8))

    def loss(q, k, v):
        return jnp.sum(attention.attend(q, k, v, meta, meta, cfg) ** 2)

    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    mesh = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rules = (("batch", ("data", "fsdp")), ("q_heads", "tensor"), ("kv_heads", "tensor"))
    with jax.set_mesh(mesh), sharding.activation_rules(rules):
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        assert "manual_computation" in step.lower(q, k, v).as_text()
        got = step(q, k, v)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for name, a, b in zip("qkv", got[1], want[1]):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
