"""TrainState shardings: Adam moments follow the parameter shardings (optax.tree_map_params),
statically frozen parameters hold no optimiser state, counters are replicated."""
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from irg_jax.config.irgl import irgl_config
from irg_jax.parallel.mesh import build_mesh
from irg_jax.train import state as state_lib
from irg_jax.train.optimizer import make_optimizer


def test_moments_follow_params_and_frozen_leaves_hold_none():
    mesh = build_mesh({"fsdp": 8})
    params = {"decoder": {"w": jnp.zeros((16, 8)), "b": jnp.zeros((8,))}, "vit": {"w": jnp.zeros((8, 16))}}
    param_shardings = {"decoder": {"w": NamedSharding(mesh, P("fsdp", None)), "b": NamedSharding(mesh, P())},
                       "vit": {"w": NamedSharding(mesh, P(None, "fsdp"))}}
    replicated = NamedSharding(mesh, P())
    config = irgl_config(stage=1, arg="tiny")
    config.freeze.vit = True
    tx, _ = make_optimizer(config, params)
    abstract = jax.eval_shape(lambda p: state_lib.create(p, tx, jax.random.key(0), True), params)
    out = state_lib.shardings(abstract, param_shardings, replicated, tx)

    adam = [s for s in jax.tree.leaves(out.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    for moments in (adam[0].mu, adam[0].nu):
        assert moments["decoder"]["w"].spec == P("fsdp", None)
        assert moments["decoder"]["b"].spec == P()
        assert isinstance(moments["vit"]["w"], optax.MaskedNode)  # frozen: no state, no sharding
    assert adam[0].count == replicated
    assert out.ema == param_shardings and out.params == param_shardings and out.step == replicated
    # The shardings tree has the state's structure (what jit's in/out_shardings need).
    assert jax.tree.structure(out.opt_state) == jax.tree.structure(
        jax.tree.map(lambda _: replicated, abstract.opt_state))
    sharded_leaves = jax.tree.leaves(out.opt_state)
    assert sum(s.spec == P("fsdp", None) for s in sharded_leaves) == 2  # mu and nu of decoder/w
