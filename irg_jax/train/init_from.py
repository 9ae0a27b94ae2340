"""Initial parameters from elsewhere: a converted BAGEL / exported params tree, or a previous run's EMA."""
from __future__ import annotations

import pathlib

import jax
import ml_collections
import orbax.checkpoint as ocp

from irg_jax.train import export


def load_params(ckpt_cfg: ml_collections.ConfigDict, bundle, mesh: jax.sharding.Mesh):
    """Sharded float32 params for a fresh run (``checkpoint.init_from`` / ``init_from_kind``).

    - ``params``: an export directory (``DIR/params``), e.g. ``irg_jax.convert bagel-to-orbax``
      output (IRG stage 1 starts from BAGEL's EMA) or a run's ``WORKDIR/export``;
    - ``train_state``: a previous run's workdir; its latest checkpoint's EMA (IRG stage 2
      starts from the stage-1 EMA), read without restoring the optimiser state.
    """
    path = pathlib.Path(ckpt_cfg.init_from)
    with jax.set_mesh(mesh):
        if ckpt_cfg.init_from_kind == "params":
            return export.restore_params(path, bundle.abstract_params, bundle.param_shardings)
        manager = ocp.CheckpointManager(path.absolute() / "checkpoints")
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"checkpoint.init_from: no complete checkpoint under {path / 'checkpoints'}")
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              bundle.abstract_params, bundle.param_shardings)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item={"ema": target}, partial_restore=True)))
        return restored["state"]["ema"]
