"""Train IRG: ``python -m irg_jax.train --config configs/<name>.py[:arg] --workdir DIR [--config.key=value ...]``.

The config file's ``get_config(arg)`` builds the config; ``--config.a.b=v`` overrides any
key (unknown keys are rejected). The resolved config is validated before any device work
and written to ``DIR/config.json`` once the start-up checks (model, tokenizer, data, resume)
have passed. Re-running the same command resumes from the latest complete checkpoint in DIR;
a changed config is refused unless only keys in ``irg_jax.config.resume.ALLOWED_ON_RESUME``
changed, and is then kept beside the old one as ``DIR/config.step<N>.json``.

Several processes (hosts) train one model when the environment says so (``irg_jax.runtime``):
``IRG_COORDINATOR_ADDRESS=host:port IRG_NUM_PROCESSES=N IRG_PROCESS_ID=i`` on every process,
all with the same command line and a DIR they all see; or ``IRG_DISTRIBUTED=1`` to let JAX
detect the cluster (Cloud TPU, SLURM, Open MPI, Kubernetes). Each process loads only the rows
of the global batch its devices hold; process 0 writes config.json, metrics and sample PNGs;
all processes write the checkpoints and the export together.
"""
from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config: path/to/config.py[:arg]. Override keys with --config.key=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, resolved config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from irg_jax import runtime
    from irg_jax.config import ConfigError, validate
    from irg_jax.config.resume import ResumeConfigError

    runtime.maybe_initialize_distributed()
    runtime.quiet_library_logs()
    config = _CONFIG.value
    try:
        validate(config)
    except ConfigError as e:
        raise app.UsageError(str(e)) from None

    from irg_jax.train import loop
    from irg_jax.train.init_from import InitFromMismatch
    try:
        loop.train(config, _WORKDIR.value)
    except (ResumeConfigError, InitFromMismatch) as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(".cache/jax"))
    app.run(main)
