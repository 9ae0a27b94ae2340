"""Mesh construction, logical sharding rules, sharded init and FSDP memory per device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from irg_jax.config import DEFAULT_RULES
from irg_jax.parallel import sharding
from irg_jax.parallel.mesh import build_mesh, resolve_mesh_shape


def sharded_init(create, mesh, rules) -> nnx.Module:
    """``create()`` made directly in its sharded layout: abstract state from ``eval_shape``, its
    shardings from the rules, the state made by one jit with those ``out_shardings`` (no device
    holds it whole), as ``irg_jax.train.model_setup.build`` makes the model's parameters."""
    graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
    shardings = sharding.state_shardings(abstract_state, mesh, rules)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("shape, want", [
    ({"data": 1, "fsdp": -1, "tensor": 1}, (1, 8, 1)),
    ({"data": 2, "fsdp": 4, "tensor": 1}, (2, 4, 1)),
    ({"data": -1, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
    ({"data": 8}, (8, 1, 1)),
])
def test_mesh_shapes(shape, want):
    mesh = build_mesh(shape)
    assert tuple(mesh.shape.values()) == want
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert all(t == AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("shape, msg", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, "has 3 devices, but 8"),
    ({"data": -1, "fsdp": -1}, "at most one axis"),
    ({"data": 3, "fsdp": -1}, "cannot fill 8"),
    ({"pipeline": 2}, "unknown axis"),
    ({"data": 0}, "must be positive"),
])
def test_mesh_errors(shape, msg):
    with pytest.raises(ValueError, match=msg):
        resolve_mesh_shape(shape, 8)


def test_logical_to_spec_rules():
    mesh = build_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = DEFAULT_RULES
    assert sharding.logical_to_spec(("embed", "mlp"), rules, (64, 128), mesh) == P("fsdp", "tensor")
    # An axis is never used twice; an indivisible dimension stays replicated.
    assert sharding.logical_to_spec(("embed", "embed"), rules, (64, 64), mesh) == P("fsdp", None)
    assert sharding.logical_to_spec(("embed", "mlp"), rules, (63, 128), mesh) == P(None, "tensor")
    assert sharding.logical_to_spec(("batch", None), rules, (8, 3), mesh) == P(("data", "fsdp"), None)
    # Size-1 mesh axes drop out, so FSDP-only is the same rules on a different mesh.
    mesh1 = build_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    assert sharding.logical_to_spec(("embed", "mlp"), rules, (64, 128), mesh1) == P("fsdp", None)


class TwoLayerMLP(nnx.Module):
    def __init__(self, d, h, rngs):
        init = nnx.initializers.lecun_normal()
        self.w1 = sharding.param(init(rngs.params(), (d, h)), ("embed", "mlp"))
        self.b1 = sharding.param(jnp.zeros((h,)), ("mlp",))
        self.w2 = sharding.param(init(rngs.params(), (h, d)), ("mlp", "embed"))
        self.scale = sharding.param(jnp.ones((d,)), ("norm",))

    def __call__(self, x):
        h = jax.nn.gelu(x @ self.w1 + self.b1)
        h = sharding.constrain(h, ("batch", "mlp"))
        return (h @ self.w2) * self.scale


def _forward(model, x):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_forward_equals_single_device(mesh_shape):
    x = jax.random.normal(jax.random.key(1), (16, 64))
    with jax.default_device(jax.devices()[0]):
        ref = _forward(TwoLayerMLP(64, 256, nnx.Rngs(0)), x)
    mesh = build_mesh(mesh_shape)
    model = sharded_init(lambda: TwoLayerMLP(64, 256, nnx.Rngs(0)), mesh, DEFAULT_RULES)
    with jax.set_mesh(mesh), sharding.activation_rules(DEFAULT_RULES):
        xs = jax.device_put(x, jax.NamedSharding(mesh, P(("data", "fsdp"))))
        out = _forward(model, xs)
        hlo = jax.jit(lambda s, x: nnx.merge(nnx.graphdef(model), s)(x)).lower(nnx.state(model), xs).as_text()
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # The activation constraint made it into the program (it silently vanishes under a bare `with mesh:`).
    assert "sharding_constraint" in hlo


def test_fsdp_bytes_per_device():
    mesh = build_mesh({"fsdp": 8})
    model = sharded_init(lambda: TwoLayerMLP(256, 1024, nnx.Rngs(0)), mesh, DEFAULT_RULES)
    state = nnx.state(model)
    leaves = jax.tree.leaves(state)
    total = sum(l.size * l.dtype.itemsize for l in leaves)
    small = sum(l.size * l.dtype.itemsize for l in leaves if l.ndim == 1)
    per_device = sharding.bytes_per_device(state)
    assert len(per_device) == 8
    for nbytes in per_device.values():
        assert nbytes <= total / 8 * 1.02 + small
    frac = sharding.replicated_fraction(state)
    assert 0 < frac < 0.01  # only the 1-D norm scale stays replicated
    # The matrices really are split 8 ways along "embed".
    assert model.w1.get_value().sharding.spec == P("fsdp", None)


def test_param_rank_mismatch_is_clear():
    with pytest.raises(ValueError, match="do not match parameter rank"):
        sharding.param(jnp.zeros((3, 4)), ("embed",))


def test_large_unshardable_parameter_is_an_error_naming_it():
    """No silent replication: a parameter over the limit that the rules shard on a dimension the
    mesh does not divide fails with its path and sizes; under the limit it is replicated."""
    mesh = build_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    state = nnx.state(nnx.eval_shape(lambda: TwoLayerMLP(60, 128, nnx.Rngs(0))))  # 60 % 8 != 0
    with pytest.raises(ValueError, match=r"w1.*\[60, 128\].*dim 0 \(embed\) = 60 is not divisible by mesh axes "
                                         r"\('fsdp',\) \(size 8\)"):
        sharding.state_shardings(state, mesh, DEFAULT_RULES, max_unshardable_bytes=1024)
    shardings = sharding.state_shardings(state, mesh, DEFAULT_RULES, max_unshardable_bytes=60 * 128 * 4)
    assert shardings["w1"].spec == P(None, None)
    held, replicated = sharding.replicated_share(
        jax.tree.map(lambda v: v.get_value(), state, is_leaf=lambda x: isinstance(x, nnx.Variable)), shardings)
    assert replicated == held  # nothing here divides by 8: everything is replicated, and reported
    divisible = nnx.state(nnx.eval_shape(lambda: TwoLayerMLP(64, 128, nnx.Rngs(0))))
    shardings = sharding.state_shardings(divisible, mesh, DEFAULT_RULES, max_unshardable_bytes=1024)
    assert shardings["w1"].spec == P("fsdp", None)


def test_logical_names_are_flax_partitioning_metadata():
    """The logical names live in Flax's own metadata: nnx.get_partition_spec reads them (as
    names; our rules table maps them), and creating a parameter under a mesh does not try to
    place it by those names (eager sharding is off for them)."""
    mesh = build_mesh({"fsdp": 8})
    with jax.set_mesh(mesh):
        model = TwoLayerMLP(64, 128, nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(model))
    assert specs["w1"].get_value() == P("embed", "mlp")
    assert specs["b1"].get_value() == P("mlp")
    assert sharding.logical_axes(model.w2) == ("mlp", "embed")
    shardings = sharding.state_shardings(nnx.state(nnx.eval_shape(lambda: TwoLayerMLP(64, 128, nnx.Rngs(0)))),
                                         mesh, DEFAULT_RULES)
    assert shardings["w2"].spec == P(None, "fsdp")


def test_stacked_decoder_layers_name_an_unsharded_layers_axis():
    """Scanned decoder layers (nnx.vmap with transform_metadata) carry [num_layers] first, named
    None, in front of each single layer's names; the stacked layer's values are the layers made
    one by one from the split keys."""
    import ml_collections
    from irg_jax.config.irgl import irgl_config
    from irg_jax.model import decoder as decoder_lib

    model_cfg = irgl_config(stage=1, arg="tiny").model
    llm = ml_collections.FrozenConfigDict(model_cfg.llm)
    attn = ml_collections.FrozenConfigDict(model_cfg.attention)
    stacked = nnx.state(decoder_lib._stack_layers(llm, attn, nnx.Rngs(3), 0))
    keys = jax.random.split(nnx.Rngs(3).params(), llm.num_layers)
    singles = [nnx.state(decoder_lib.DecoderLayer(llm, attn, rngs=nnx.Rngs(params=k), mlp_chunk=0)) for k in keys]
    flat, single_flat = nnx.to_flat_state(stacked), [dict(nnx.to_flat_state(s)) for s in singles]
    assert len(flat) == len(single_flat[0]) > 10
    for path, var in flat:
        one = single_flat[0][path]
        assert sharding.logical_axes(var) == (None,) + sharding.logical_axes(one), path
        assert var.get_value().shape == (llm.num_layers,) + one.get_value().shape, path
        np.testing.assert_array_equal(np.asarray(var.get_value()[1]), np.asarray(single_flat[1][path].get_value()))
