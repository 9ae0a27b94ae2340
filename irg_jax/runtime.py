"""Multi-process start-up: decide from the environment whether to call ``jax.distributed.initialize``.

JAX's own multi-controller runtime is the distributed engine; this module only decides
*whether* to start it and with which arguments. Call :func:`maybe_initialize_distributed`
once, first thing in an entry point, before anything touches a JAX backend.

Decision, first match wins (``environ`` is ``os.environ`` unless given):

1. ``IRG_DISTRIBUTED=0`` (or ``false``/``no``): single process, whatever else is set.
2. Any of ``IRG_COORDINATOR_ADDRESS``, ``IRG_NUM_PROCESSES``, ``IRG_PROCESS_ID``: explicit
   arguments (the GPU launch scripts set all three). Unset ones are left for JAX to detect.
3. ``IRG_DISTRIBUTED=1``: let JAX detect everything (Cloud TPU VM metadata, SLURM, Open MPI,
   Kubernetes). The TPU launcher sets this on every worker.
4. Inside a SLURM step with more than one task (``SLURM_STEP_NUM_TASKS > 1``): JAX's SLURM
   detection.
5. A multi-host TPU environment: ``TPU_WORKER_HOSTNAMES`` naming more than one host, or
   ``MEGASCALE_COORDINATOR_ADDRESS`` (multislice): JAX detection.
6. Otherwise: single process.

``IRG_LOCAL_DEVICE_IDS`` (comma-separated ints) restricts the devices this process drives,
e.g. one process per GPU; it applies to cases 2-5. Without it, inside a SLURM step with one
task per node, every GPU of the node is kept, counted from ``SLURM_GPUS_ON_NODE`` or
``CUDA_VISIBLE_DEVICES`` (JAX's SLURM detection alone would keep only GPU ``SLURM_LOCALID``).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
from absl import logging

_FALSE = ("0", "false", "no", "off")
_TRUE = ("1", "true", "yes", "on")


def _int_env(environ: Mapping[str, str], key: str) -> int:
    value = environ[key]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def _device_ids_env(environ: Mapping[str, str], key: str) -> list[int]:
    value = environ[key]
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not a comma-separated list "
                         "of integers") from None


def _slurm_gpus_on_node(environ: Mapping[str, str]) -> int | None:
    if environ.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(environ["SLURM_GPUS_ON_NODE"])
    visible = environ.get("CUDA_VISIBLE_DEVICES", "")
    if visible and visible not in ("NoDevFiles", "-1"):
        return len([x for x in visible.split(",") if x.strip()])
    return None


def distributed_init_kwargs(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Arguments for ``jax.distributed.initialize``, or None to run as a single process.

    Pure: reads ``environ`` only; see the module docstring for the rules.
    """
    environ = os.environ if environ is None else environ
    switch = environ.get("IRG_DISTRIBUTED", "").strip().lower()
    if switch in _FALSE:
        return None
    if switch and switch not in _TRUE:
        raise ValueError(f"IRG_DISTRIBUTED={environ['IRG_DISTRIBUTED']!r}: expected 1 or 0")

    kwargs: dict[str, Any] = {}
    slurm_tasks = _int_env(environ, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in environ else 0
    if "IRG_LOCAL_DEVICE_IDS" in environ:
        kwargs["local_device_ids"] = _device_ids_env(environ, "IRG_LOCAL_DEVICE_IDS")
    elif slurm_tasks:
        nodes = _int_env(environ, "SLURM_STEP_NUM_NODES") if "SLURM_STEP_NUM_NODES" in environ else 0
        gpus = _slurm_gpus_on_node(environ)
        if slurm_tasks == nodes and gpus:  # one task per node drives every GPU of its node
            kwargs["local_device_ids"] = list(range(gpus))

    explicit = {"IRG_COORDINATOR_ADDRESS": "coordinator_address",
                "IRG_NUM_PROCESSES": "num_processes", "IRG_PROCESS_ID": "process_id"}
    if any(key in environ for key in explicit):
        for key, arg in explicit.items():
            if key in environ:
                kwargs[arg] = environ[key] if arg == "coordinator_address" else _int_env(environ, key)
        if "num_processes" in kwargs and "process_id" in kwargs:
            if not 0 <= kwargs["process_id"] < kwargs["num_processes"]:
                raise ValueError(f"IRG_PROCESS_ID={kwargs['process_id']} is outside "
                                 f"[0, IRG_NUM_PROCESSES={kwargs['num_processes']})")
        return kwargs

    if switch in _TRUE or slurm_tasks > 1:
        return kwargs
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return kwargs
    return None


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Start JAX's multi-controller runtime when the environment asks for it; True if started.

    Safe to call twice (the second call is a no-op). Logs process index and count either way.
    """
    if jax.distributed.is_initialized():
        return True
    kwargs = distributed_init_kwargs(environ)
    if kwargs is None:
        logging.info("single process: jax.distributed not initialised")
        return False
    logging.info("jax.distributed.initialize(%s)", kwargs or "auto-detected")
    jax.distributed.initialize(**kwargs)
    logging.info("process %d of %d: %d local devices, %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_primary() -> bool:
    """True on process 0, the one that writes logs, metrics and other single-writer files."""
    return jax.process_index() == 0


class _QuietLibraries:
    """A logging filter that drops INFO chatter from Orbax and Grain (warnings still pass)."""

    PATHS = ("/orbax/", "/grain/", "/tensorstore/")

    def filter(self, record) -> bool:
        return record.levelno >= 30 or not any(p in record.pathname for p in self.PATHS)


def quiet_library_logs() -> None:
    """Keep the console readable: library INFO logs off, our own INFO logs on."""
    import logging as py_logging
    logging.get_absl_handler().addFilter(_QuietLibraries())
    py_logging.getLogger().addFilter(_QuietLibraries())
