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

Several processes on one machine (CPU, e.g. the 2-process test; jax's CPU collectives are Gloo
by default)::

    IRG_COORDINATOR_ADDRESS=localhost:1234 IRG_NUM_PROCESSES=2 IRG_PROCESS_ID=0 \
        XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m irg_jax.train ... &
    IRG_COORDINATOR_ADDRESS=localhost:1234 IRG_NUM_PROCESSES=2 IRG_PROCESS_ID=1 \
        XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m irg_jax.train ...

Under multi-controller JAX every process runs the same program: anything that touches a
global array (steps, checkpoint saves and restores, the export, sample grids) is called by all
processes, and only files that one writer produces (metrics, config, PNGs) are written by
:func:`is_primary`. The collectives below (:func:`any_process`, :func:`agreed_int`) are how
processes agree on host-side decisions.

Compilation can take very different times on different processes (JAX's persistent cache is
written by process 0 only, and on CPU its keys differ between processes, so process 0 loads
from the cache what the others compile), while the Gloo CPU collectives give processes only
30 s to meet when a group of devices first communicates. :class:`SyncedJit` therefore
compiles each new executable ahead of its first run and lets no process run it before every
process has compiled it (:func:`barrier`).
"""
from __future__ import annotations

import collections
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
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


def any_process(flag: bool) -> bool:
    """True if ``flag`` is true on any process. A collective: every process must call it."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))))


def agreed_int(value: int | None, what: str) -> int | None:
    """``value`` (None allowed), checked to be the same on every process; raises on every process
    if not (rather than letting processes with different views run different collectives)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    local = np.asarray([-1 if value is None else int(value)], np.int32)
    every = np.asarray(multihost_utils.process_allgather(local)).reshape(-1)
    if np.any(every != every[0]):
        raise RuntimeError(f"processes disagree on {what}: {every.tolist()} (process 0 first)")
    return None if every[0] < 0 else int(every[0])


_BARRIER_USES: collections.Counter = collections.Counter()


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Block until every process reaches this barrier (all processes pass the same names in the
    same order; the n-th use of a name is its own barrier). Uses the ``jax.distributed``
    coordination service, not a device collective, so its timeout is ours to choose."""
    if jax.process_count() == 1:
        return
    _BARRIER_USES[name] += 1
    from jax._src import distributed  # jax 0.10 has no public handle on the coordination-service barrier
    distributed.global_state.client.wait_at_barrier(f"irg_jax/{name}/{_BARRIER_USES[name]}", int(timeout_s * 1000))


class SyncedJit:
    """A ``jax.jit`` function, compiled ahead of its first call per input signature (shapes,
    dtypes, tree structure); with several processes, all of them meet at a :func:`barrier`
    between compiling a new executable and running it (see the module docstring)."""

    def __init__(self, jitted: Callable, name: str):
        self._jitted, self._name = jitted, name
        self._compiled: dict = {}

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    def __call__(self, *args):
        leaves, treedef = jax.tree.flatten(args)
        key = (treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x))), getattr(x, "weak_type", False))
                              for x in leaves))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._jitted.lower(*args).compile()
            self._compiled[key] = compiled
            barrier(f"{self._name}/compiled")
        return compiled(*args)


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


# ------------------------------------------------------------------------------ persistent compilation cache

DEFAULT_COMPILATION_CACHE = ".cache/jax"
_MIN_COMPILE_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def setup_compilation_cache(directory: str | os.PathLike | None = None, min_compile_time_secs: float = 0.0,
                            environ: Mapping[str, str] | None = None) -> str | None:
    """Point JAX's persistent compilation cache at ``directory``; returns the directory used (None: off).

    Works after ``import jax`` as long as it runs before the first compilation (JAX reads
    ``JAX_COMPILATION_CACHE_DIR`` only when it is imported, so setting the variable later has
    no effect). ``directory``: None keeps a directory already configured (the environment
    variable), else ``.cache/jax`` under the working directory; ``""`` turns the cache off.
    ``min_compile_time_secs`` replaces JAX's threshold (1 s: anything that compiles faster is
    not written) unless ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` is set; 0 caches every
    program, so a rerun compiles nothing. Entries of any size are written (JAX's default).
    """
    environ = os.environ if environ is None else environ
    if directory is None:
        directory = jax.config.jax_compilation_cache_dir or DEFAULT_COMPILATION_CACHE
    if not str(directory):
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = str(directory) if "://" in str(directory) else os.path.abspath(directory)  # gs:// stays as is
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    if _MIN_COMPILE_TIME_ENV not in environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    return path


class CompileStats:
    """Counts XLA programs built while active, from JAX's monitoring events: ``loaded`` came
    from the persistent cache, ``compiled`` were compiled (and ``written`` of those stored in
    it). A context manager; listeners are removed on exit."""

    _REQUEST = "/jax/core/compile/backend_compile_duration"  # every executable built, cache hit or not
    _HIT = "/jax/compilation_cache/cache_hits"
    _WRITE = "/jax/compilation_cache/cache_misses"  # recorded when an entry is written

    def __init__(self):
        self.requests = self.loaded = self.written = 0

    @property
    def compiled(self) -> int:
        return self.requests - self.loaded

    def _on_event(self, event: str, **_) -> None:
        if event == self._HIT:
            self.loaded += 1
        elif event == self._WRITE:
            self.written += 1

    def _on_duration(self, event: str, _duration: float, **_) -> None:
        if event == self._REQUEST:
            self.requests += 1

    def __enter__(self) -> "CompileStats":
        jax.monitoring.register_event_listener(self._on_event)
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_listener(self._on_event)
        jax.monitoring.unregister_event_duration_listener(self._on_duration)

    def summary(self) -> str:
        where = jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None
        return (f"XLA programs: {self.loaded} loaded from the compilation cache, {self.compiled} compiled "
                f"({self.written} written; cache: {where or 'off'})")
