"""Initial parameters from elsewhere: a converted BAGEL / exported params tree, or a previous run's EMA."""
from __future__ import annotations

import pathlib

import jax
import ml_collections
import orbax.checkpoint as ocp

from irg_jax.convert.autoencoder_file import AE_FILE, load_autoencoder_for
from irg_jax.train import export


def autoencoder_file(config: ml_collections.ConfigDict) -> pathlib.Path | None:
    """Where the frozen FLUX autoencoder's weights come from (None: identity AE or none given).

    A converted checkpoint (or export) holds ``ae.safetensors`` next to its params; a stage-2
    run started from a stage-1 workdir finds it in that run's export.
    """
    if config.model.autoencoder.kind != "flux" or not config.checkpoint.init_from:
        return None
    root = pathlib.Path(config.checkpoint.init_from)
    for folder in (root, root / "export"):
        if (folder / AE_FILE).is_file():
            return folder / AE_FILE
    raise FileNotFoundError(f"checkpoint.init_from={root}: no {AE_FILE} there or in its export/; the FLUX "
                            "autoencoder cannot be random")


def load_autoencoder(config: ml_collections.ConfigDict):
    """The frozen autoencoder for training: FLUX weights from ``init_from``, or None (built from config)."""
    path = autoencoder_file(config)
    return None if path is None else load_autoencoder_for(path.parent, config.model)


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
