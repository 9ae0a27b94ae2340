"""Build the model for functional training: graphdef, sharded params, constants, frozen AE, forward."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from irg_jax.model.autoencoder import build_autoencoder
from irg_jax.model.bagel import Bagel, gather_latent_tokens, latent_tokens
from irg_jax.parallel import sharding


@dataclasses.dataclass
class ModelBundle:
    """Bagel split for use inside jit, plus the frozen autoencoder that feeds it."""

    graphdef: Any            # nnx GraphDef of Bagel
    abstract_params: Any     # pure dict of ShapeDtypeStruct (nothing allocated)
    param_shardings: Any     # pure dict of NamedSharding, from the logical axis rules
    consts: Any              # non-parameter state: the fixed sin-cos tables
    autoencoder: nnx.Module  # frozen, outside the trained params (as in BAGEL)
    model_cfg: ml_collections.ConfigDict

    def module(self, params: Any) -> Bagel:
        return nnx.merge(self.graphdef, params, self.consts)


def build(model_cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules, seed: int,
          autoencoder: nnx.Module | None = None, *,
          max_unshardable_mib: float | None = None) -> tuple[ModelBundle, Callable[[], Any]]:
    """Returns the bundle and ``init_params()``, which creates the parameters already sharded.

    ``max_unshardable_mib``: a parameter over this size that the rules cannot shard on this
    mesh is an error (``sharding.max_unshardable_mib``)."""
    create = lambda: Bagel(model_cfg, rngs=nnx.Rngs(seed))
    abstract = nnx.eval_shape(create)
    graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
    limit = None if max_unshardable_mib is None else int(max_unshardable_mib * 2**20)
    shardings = sharding.state_shardings(abstract_params, mesh, rules, max_unshardable_bytes=limit).to_pure_dict()

    abstract.rebuild_tables()  # the only non-parameter state; cheap to build concretely
    consts = nnx.split(abstract, nnx.Param, ...)[2]
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(consts)):
        raise TypeError("Bagel has non-parameter state that rebuild_tables() does not create")

    def init_params():
        def make():
            return nnx.split(create(), nnx.Param, ...)[1].to_pure_dict()
        with jax.set_mesh(mesh):
            return jax.jit(make, out_shardings=shardings)()

    if autoencoder is None:
        autoencoder = build_autoencoder(model_cfg.autoencoder, rngs=nnx.Rngs(seed + 1))
    bundle = ModelBundle(graphdef, abstract_params.to_pure_dict(), shardings, consts, autoencoder, model_cfg)
    return bundle, init_params


def make_forward(bundle: ModelBundle) -> Callable[[Any, dict, jax.Array], dict]:
    """``forward(params, batch, key)``: encode the pack's images (frozen AE), draw noise, run Bagel.

    The output holds Bagel's outputs plus ``ce_sum``, the summed CE of the batch's CE tokens
    (computed chunk by chunk, ``model.ce_chunk``).

    Bridged targets (``latent_bridge_w`` > 0, see ``irg_jax.data.packing``) get the noise
    ``eps + w * (x_bridge - x0)``, which puts them on the refinement path from a clean image."""
    ae_graphdef, ae_state = nnx.split(bundle.autoencoder)
    patch = bundle.model_cfg.latent.patch_size

    def forward(params, batch, key):
        k_posterior, k_noise = jax.random.split(key)
        ae = nnx.merge(ae_graphdef, ae_state)
        tokens = jax.lax.stop_gradient(latent_tokens(ae, batch["vae_images"], k_posterior, patch))
        x0 = gather_latent_tokens(tokens, batch["latent_src"])
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        if "latent_bridge_w" in batch:
            x_bridge = gather_latent_tokens(tokens, batch["latent_bridge_src"])
            noise = noise + batch["latent_bridge_w"][..., None] * (x_bridge - x0)
        model = bundle.module(params)
        out = model(batch, x0, noise)
        out["ce_sum"] = model.ce_sum(out["ce_hidden"], batch["ce_labels"], batch["ce_valid"])
        return out

    return forward
