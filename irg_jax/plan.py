"""Plan a training run before paying for hardware: per-device memory, FLOPs per step, MFU needed.

    python -m irg_jax.plan --config configs/irgl_stage1.py --devices 8 --mesh data=1,fsdp=8,tensor=1 \\
        [--config.key=value ...] [--target_step_time 20] [--device_kind 'TPU v5p'] [--json plan.json]
    python -m irg_jax.plan --config configs/irgl_stage1.py --devices 8 --generation [--no_hoist]

The real train step (``irg_jax.train.setup.train_setup``, the one the training loop runs:
same state, batch and constant shardings, state donated) is lowered and compiled ahead of time on ``ShapeDtypeStruct`` inputs for ``--devices`` simulated CPU devices
(``--xla_force_host_platform_device_count``): no parameter, optimiser or batch memory is
allocated. The batch is one pack budget set (the largest image bucket of ``config.data``, the
one that bounds memory) with ``config.batch_size`` packs sharded over ``('data', 'fsdp')``.

Reported, per device:
- memory from ``compiled.memory_analysis()``: arguments (state + batch + the frozen autoencoder
  and the sin-cos tables, replicated arguments as in the loop), outputs, the donated part
  (aliased), temporaries and generated code; peak = arguments + outputs - aliased +
  temporaries + code.
- the state broken down by part, from the shardings (exact, no compilation involved).

And per step: the analytic model FLOPs (``irg_jax.model.bagel.training_flops``), XLA's count
of the compiled per-device program times the devices, and the MFU needed for
``--target_step_time`` on ``--device_kind`` (peaks from ``irg_jax.train.mfu.PEAK_FLOPS``).

Caveats. The compiler is XLA:CPU: fusion and buffer assignment on GPU/TPU differ, so the
temporaries are an estimate (the parameter, optimiser, EMA and batch figures are exact). XLA
counts a loop body once, so with ``scan_layers`` and the blockwise attention the XLA FLOPs
under-count; the table flags it and the analytic count is the one to use for MFU.
"""
from __future__ import annotations

import sys


def _devices_from_argv(argv: list[str]) -> int | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--devices="):
            return int(arg.split("=", 1)[1])
        if arg == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
    return None


if __name__ == "__main__":  # before jax initialises its backend
    from irg_jax.parallel.mesh import simulate_host_devices
    _n = _devices_from_argv(sys.argv)
    if _n:
        simulate_host_devices(_n)

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from irg_jax.data import packed_batch  # noqa: E402
from irg_jax.model.autoencoder import build_autoencoder  # noqa: E402
from irg_jax.model.bagel import forward_flops, recompute_flops, training_flops  # noqa: E402
from irg_jax.parallel.mesh import MESH_AXES, build_mesh, parse_mesh  # noqa: E402
from irg_jax.parallel.memory import largest_values, shard_bytes  # noqa: E402
from irg_jax.parallel.sharding import replicated_share  # noqa: E402
from irg_jax.train import mfu as mfu_lib  # noqa: E402
from irg_jax.train.setup import train_setup  # noqa: E402

GiB = 1024**3
# Substring of a device kind (lower case) -> memory per device from data sheets, bytes.
DEVICE_MEMORY = (
    ("h200", 141e9),
    ("h100", 80 * GiB),
    ("a100", 80 * GiB),
    ("l4", 24 * GiB),
    ("v6 lite", 32 * GiB),
    ("v6e", 32 * GiB),
    ("v5p", 95 * GiB),
    ("v5 lite", 16 * GiB),
    ("v5e", 16 * GiB),
    ("v4", 32 * GiB),
)


def _lookup(table, device_kind: str, what: str) -> float:
    kind = device_kind.lower()
    for key, value in table:
        if key in kind:
            return value
    raise ValueError(f"--device_kind {device_kind!r}: no {what} known; known kinds: {[k for k, _ in table]}")


def peak_flops(device_kind: str) -> float:
    """Dense bf16 peak FLOP/s of one device of this kind (``irg_jax.train.mfu.PEAK_FLOPS``)."""
    return _lookup(mfu_lib.PEAK_FLOPS, device_kind, "peak FLOP/s")


def device_memory(device_kind: str) -> float:
    """Memory of one device of this kind in bytes (:data:`DEVICE_MEMORY`)."""
    return _lookup(DEVICE_MEMORY, device_kind, "device memory")


@dataclasses.dataclass
class MemoryPlan:
    """Bytes per device, from ``compiled.memory_analysis()``."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    generated_code: int

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code


@dataclasses.dataclass
class StepPlan:
    num_devices: int
    mesh: dict[str, int]
    batch_size: int
    budgets: packed_batch.PackBudgets
    param_count: int
    trainable_count: int
    state_bytes: dict[str, int]      # per device, by part (exact, from the shardings)
    replicated_state_bytes: int      # per device: params + EMA + optimizer leaves held whole on every device
    memory: MemoryPlan               # per device
    analytic_flops: float            # model FLOPs per step (forward + backward)
    analytic_breakdown: dict[str, float]  # forward FLOPs per step by component
    recompute_flops: float           # what rematerialisation adds (bagel.recompute_flops)
    xla_flops: float                 # compiled per-device count x devices (loop bodies counted once)
    xla_loops: bool                  # True if the compiled program has while loops (under-count)
    largest_values: list[dict]       # the biggest arrays of the compiled program (see largest_values)
    lower_seconds: float
    compile_seconds: float
    hlo_text: str = dataclasses.field(repr=False, default="")  # the optimised module (for --hlo)

    def required_mfu(self, step_seconds: float, device_kind: str) -> float:
        return mfu_lib.mfu(self.analytic_flops, step_seconds, peak_flops(device_kind), self.num_devices)

    def step_time_at(self, mfu: float, device_kind: str) -> float:
        return self.analytic_flops / (mfu * peak_flops(device_kind) * self.num_devices)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("hlo_text")
        out["memory"]["peak"] = self.memory.peak
        out["budgets"] = dataclasses.asdict(self.budgets)
        return out


def plan_budgets(config: ml_collections.ConfigDict) -> packed_batch.PackBudgets:
    """The pack budgets of the largest image bucket (the one that bounds memory)."""
    from irg_jax.data.config import budgets_from_config
    return budgets_from_config(config.data)[-1]


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def lower_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """Lower the loop's train step (``irg_jax.train.setup.train_setup``) on abstract inputs;
    returns ``(lowered, abstract_args, bundle, budgets)``.

    ``abstract_args`` is ``(state, batch, window, autoencoder_state, tables)``, all
    ShapeDtypeStructs with their shardings.
    """
    abstract_ae = nnx.eval_shape(lambda: build_autoencoder(config.model.autoencoder,
                                                           rngs=nnx.Rngs(config.seed + 1)))
    setup = train_setup(config, mesh, autoencoder=abstract_ae)
    budgets = plan_budgets(config)
    args = (setup.abstract_state, setup.abstract_batch(budgets), setup.abstract_window) + setup.abstract_constants()
    return setup.lower(budgets), args, setup.bundle, budgets


def plan_train_step(config: ml_collections.ConfigDict, devices=None) -> StepPlan:
    """Lower and compile the train step for ``devices`` (default: all) and collect the numbers."""
    devices = list(jax.devices() if devices is None else devices)
    mesh = build_mesh(config.mesh, devices)
    t0 = time.perf_counter()
    lowered, (state, batch, _, ae, tables), bundle, budgets = lower_train_step(config, mesh)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    try:
        hlo = compiled.as_text()
    except Exception:  # some backends cannot print the optimised module
        hlo = " while("

    stats = compiled.memory_analysis()
    memory = MemoryPlan(int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                        int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes),
                        int(stats.generated_code_size_in_bytes))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    from irg_jax.train.optimizer import static_frozen_mask
    frozen = static_frozen_mask(bundle.abstract_params, config.freeze)
    trainable = sum(int(np.prod(p.shape)) for p, f in zip(jax.tree.leaves(bundle.abstract_params),
                                                         jax.tree.leaves(frozen)) if not f)
    shapes = dict(batch=config.batch_size, und_len=budgets.und_len, gen_len=budgets.gen_len,
                  vit_len=budgets.vit_len, ce_len=budgets.ce_len)
    return StepPlan(
        num_devices=len(devices), mesh=dict(mesh.shape), batch_size=config.batch_size, budgets=budgets,
        param_count=_count(bundle.abstract_params), trainable_count=trainable,
        state_bytes=dict(params=shard_bytes(state.params), ema=shard_bytes(state.ema),
                         optimizer=shard_bytes(state.opt_state), batch=shard_bytes(batch),
                         frozen_autoencoder=shard_bytes(ae), tables=shard_bytes(tables)),
        replicated_state_bytes=int(replicated_share(state, jax.tree.map(lambda x: x.sharding, state))[1]),
        memory=memory,
        analytic_flops=float(training_flops(config.model, **shapes)),
        analytic_breakdown={k: float(v) for k, v in forward_flops(config.model, **shapes).items()},
        recompute_flops=recompute_flops(config.model, **shapes),
        xla_flops=float(cost.get("flops", 0.0)) * len(devices),
        xla_loops=" while(" in hlo, largest_values=largest_values(hlo),
        lower_seconds=t1 - t0, compile_seconds=t2 - t1, hlo_text=hlo)


# ------------------------------------------------------------------ report

def _gib(n: float) -> str:
    return f"{n / GiB:9.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:9.2f} MiB"


def format_plan(plan: StepPlan, device_kind: str | None = None, target_step_time: float | None = None) -> str:
    b = plan.budgets
    m = plan.memory
    mesh = ",".join(f"{k}={v}" for k, v in plan.mesh.items())
    lines = [
        f"plan: {plan.num_devices} devices, mesh {mesh}, batch {plan.batch_size} packs of "
        f"und {b.und_len} + gen {b.gen_len} tokens (vit {b.vit_len}, ce {b.ce_len}, "
        f"{b.num_vae_images} VAE images {b.vae_image_size[0]}x{b.vae_image_size[1]})",
        f"parameters: {plan.param_count / 1e6:,.1f} M ({plan.trainable_count / 1e6:,.1f} M trainable)",
        f"lowered in {plan.lower_seconds:.1f} s, compiled (XLA:CPU) in {plan.compile_seconds:.1f} s",
        "",
        "state per device (from the shardings)",
    ]
    lines += [f"  {k:<22}{_gib(v)}" for k, v in plan.state_bytes.items()]
    state_total = sum(plan.state_bytes[k] for k in ("params", "ema", "optimizer"))
    lines.append(f"  {'replicated':<22}{_gib(plan.replicated_state_bytes)}  "
                 f"({100 * plan.replicated_state_bytes / max(state_total, 1):.2f}% of params + EMA + optimizer)")
    lines += [
        "",
        "compiled memory per device (memory_analysis)",
        f"  {'arguments':<22}{_gib(m.arguments)}",
        f"  {'outputs':<22}{_gib(m.outputs)}",
        f"  {'aliased (donated)':<22}{_gib(m.aliased)}",
        f"  {'temporaries':<22}{_gib(m.temporaries)}",
        f"  {'generated code':<22}{_gib(m.generated_code)}",
        f"  {'peak':<22}{_gib(m.peak)}",
        "",
        "FLOPs per step",
        f"  {'analytic (model)':<22}{plan.analytic_flops:11.4g}",
        f"  {'+ remat recompute':<22}{plan.recompute_flops:11.4g}   "
        f"(executed: {(plan.analytic_flops + plan.recompute_flops) / plan.analytic_flops:.3f}x the model FLOPs)",
        f"  {'XLA cost analysis':<22}{plan.xla_flops:11.4g}"
        + ("   (loop bodies counted once: an under-count)" if plan.xla_loops else ""),
    ]
    lines += ["", "largest arrays of the compiled program (not all alive at once)"]
    for v in plan.largest_values:
        shape = f"{v['dtype']}[{','.join(map(str, v['shape']))}]"
        lines.append(f"  {_gib(v['bytes'])}  x{v['count']:<4d} {shape:<32} {v['op'][-70:]}")
    if device_kind:
        peak, mem = peak_flops(device_kind), device_memory(device_kind)
        lines += ["", f"on {device_kind} ({peak / 1e12:.0f} TFLOP/s bf16, {mem / GiB:.0f} GiB per device):",
                  f"  peak memory {100 * m.peak / mem:.0f}% of the device "
                  f"({'fits' if m.peak <= mem else 'does NOT fit'})"]
        for mfu in (0.3, 0.4, 0.5):
            lines.append(f"  step time at {mfu:.0%} MFU: {plan.step_time_at(mfu, device_kind):.3g} s")
        if target_step_time:
            lines.append(f"  MFU needed for a {target_step_time:g} s step: "
                         f"{plan.required_mfu(target_step_time, device_kind):.1%}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from absl import app, flags
    from irg_jax.config import ConfigError, validate

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    if jax.device_count() != FLAGS.devices or jax.devices()[0].platform != "cpu":
        raise app.UsageError(f"--devices {FLAGS.devices}: JAX started {jax.device_count()} "
                             f"{jax.devices()[0].platform} devices; run as `python -m irg_jax.plan` so the "
                             "simulated CPU devices are set up before JAX initialises")
    if FLAGS.target_step_time and not FLAGS.device_kind:
        raise app.UsageError("--target_step_time needs --device_kind")
    config = _CONFIG.value
    if FLAGS.mesh:
        try:
            mesh = parse_mesh(FLAGS.mesh, "--mesh")
        except ValueError as e:
            raise app.UsageError(str(e)) from None
        with config.unlocked():
            config.mesh = ml_collections.ConfigDict({a: mesh.get(a, 1) for a in MESH_AXES})
    try:
        try:
            validate(config, num_devices=FLAGS.devices)
        except ConfigError as e:
            if not e.key.startswith("data.groups"):  # the plan reads no data: paths may be unset
                raise
        if FLAGS.device_kind:
            peak_flops(FLAGS.device_kind), device_memory(FLAGS.device_kind)
    except (ConfigError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    if FLAGS.generation:
        from irg_jax.inference import plan as generation_plan
        gen = generation_plan.plan_generation(config, FLAGS.devices, hoist_converts=not FLAGS.no_hoist)
        print(generation_plan.format_generation_plan(gen))
        if FLAGS.json:
            with open(FLAGS.json, "w") as f:
                json.dump(dict(gen.to_json(), argv=sys.argv), f, indent=2)
        return
    plan = plan_train_step(config)
    print(format_plan(plan, FLAGS.device_kind, FLAGS.target_step_time))
    if FLAGS.hlo:
        with open(FLAGS.hlo, "w") as f:
            f.write(plan.hlo_text)
    if FLAGS.json:
        out = plan.to_json()
        out.update(device_kind=FLAGS.device_kind, target_step_time=FLAGS.target_step_time, argv=sys.argv)
        if FLAGS.device_kind:
            out["device_memory"] = device_memory(FLAGS.device_kind)
            out["peak_flops_per_device"] = peak_flops(FLAGS.device_kind)
            out["step_time_at_40pct_mfu"] = plan.step_time_at(0.4, FLAGS.device_kind)
            if FLAGS.target_step_time:
                out["required_mfu"] = plan.required_mfu(FLAGS.target_step_time, FLAGS.device_kind)
        with open(FLAGS.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Training config: path/to/config.py[:arg]. Override keys with --config.key=value.")
    flags.DEFINE_integer("devices", None, "Number of simulated devices.", lower_bound=1)
    flags.DEFINE_string("mesh", "", "Mesh shape, e.g. data=1,fsdp=8,tensor=1 (default: config.mesh).")
    flags.DEFINE_float("target_step_time", 0.0, "Step time in seconds to compute the MFU needed for.")
    flags.DEFINE_string("device_kind", "", "Device kind for the MFU and fit figures, e.g. 'TPU v5p', 'H100'.")
    flags.DEFINE_string("json", "", "Write the numbers to this JSON file.")
    flags.DEFINE_string("hlo", "", "Write the optimised HLO module to this file (to trace the largest arrays).")
    flags.DEFINE_bool("generation", False, "Plan IRG generation (think, image, reflect, refine) with the "
                      "config's model, mesh and rules instead of the train step (irg_jax.inference.plan).")
    flags.DEFINE_bool("no_hoist", False, "With --generation: compile without while-loop-invariant code motion "
                      "(no hoisted fp32 weight copies of XLA:CPU; the closer estimate for GPU/TPU).")
    flags.mark_flags_as_required(["config", "devices"])
    app.run(main)
