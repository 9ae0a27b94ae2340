"""Plan IRG generation before paying for hardware: per-device memory of the compiled programs.

    python -m irg_jax.inference.plan --devices 8 --mesh data=1,fsdp=8,tensor=1 [--model 7b]
        [--train_config configs/irgl_stage1.py] [--batch_size N] [--no_hoist] [--json plan.json]

:func:`plan_generation` lowers and compiles, on ``ShapeDtypeStruct`` inputs (nothing is
allocated), the programs of the IRG loop exactly as ``irg_jax.inference.irg_loop`` runs them
on a mesh (``IRGProgram`` placement: parameters sharded by the training rules, prompt rows
split over the data axes, caches and sampling state sharded on the rows):

  think    prefill [SYS, P] into a new KV cache, sample think 1 (``max_think_tokens``)
  image    turn-1 image: flow sampling against [cond, text-uncond] (2 CFG contexts), VAE decode
  reflect  feed image 1 back (VAE encode + ViT), sample the reflection
  refine   turn-2 image: img-uncond prefill, flow sampling against the three CFG contexts
           [cond, text-uncond, img-uncond], VAE decode
  loop     the whole loop as one program: what ``python -m irg_jax.generate`` compiles

Each phase program takes the previous phase's state (caches included) as arguments, so its
peak is that state plus the phase's own temporaries; ``loop`` is the real peak. Memory comes
from ``compiled.memory_analysis()`` (per device): peak = arguments + outputs - aliased +
temporaries + generated code, as in ``irg_jax.plan`` for training. The parameter, autoencoder
and KV-cache figures under "state" are exact (from the shardings); temporaries are XLA:CPU's
buffer assignment, an estimate of what GPU/TPU compilers do.

Defaults are IRG's (``InferenceConfig``, spec §6.6): 4096 think tokens, 1024 x 1024 images
(the largest the model's latent table allows, capped at 1024), 50 steps, one refinement
(three CFG contexts); one prompt per data-parallel rank. The system prompt is planned at
``system_tokens`` (default 256; IRG's is 985 characters, 159 words) and the prompt at
``max_prompt_tokens`` (256).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from irg_jax.inference import feedback, irg_loop
from irg_jax.inference.irg_loop import IRGProgram, InferenceConfig
from irg_jax.model.autoencoder import build_autoencoder
from irg_jax.model.bagel import Bagel
from irg_jax.model.config import latent_token_dim
from irg_jax.parallel.memory import largest_values, shard_bytes

GiB = 1024**3
PROGRAMS = ("think", "image", "reflect", "refine", "loop")
DEFAULT_MESH = {"data": 1, "fsdp": -1, "tensor": 1}


@dataclasses.dataclass
class ProgramMemory:
    """Bytes per device of one compiled program (``memory_analysis``) and its largest arrays."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    generated_code: int
    largest_values: list[dict]
    compile_seconds: float

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code


@dataclasses.dataclass
class GenerationPlan:
    num_devices: int
    mesh: dict[str, int]
    batch_size: int           # prompts per compiled batch
    rows: int                 # rows the program runs (batch padded to the data-parallel size)
    rows_per_device: int
    image_size: tuple[int, int]
    num_steps: int
    max_think_tokens: int
    num_refinements: int
    cfg_contexts: int         # contexts of the last image (3 with a refinement)
    system_tokens: int
    prompt_tokens: int
    cache_capacity: int       # KV-cache slots per context
    latent_tokens: int
    vit_tokens: int
    param_count: int
    param_dtype: str
    state_bytes: dict[str, int]   # per device, exact (from the shardings)
    programs: dict[str, ProgramMemory]
    hoist_converts: bool = True   # False: compiled without while-loop-invariant code motion

    @property
    def peak(self) -> int:
        """The largest per-device peak over the planned programs (``loop`` when planned)."""
        return max(p.peak for p in self.programs.values())

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        for name, p in self.programs.items():
            out["programs"][name]["peak"] = p.peak
        out["peak"] = self.peak
        return out


# ------------------------------------------------------------------ set-up

def _model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return config.model if "model" in config else config


def _devices(devices) -> list:
    if devices is None:
        return list(jax.devices())
    if isinstance(devices, int):
        if devices > jax.device_count():
            raise ValueError(f"{devices} devices asked for, JAX has {jax.device_count()} (simulate them with "
                             f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} JAX_PLATFORMS=cpu)")
        return list(jax.devices()[:devices])
    return list(devices)


def abstract_program(model_cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> IRGProgram:
    """An :class:`IRGProgram` over abstract parameters (in the compute dtype, as exported) and an
    abstract autoencoder, placed on ``mesh``: it lowers, it never runs."""
    abstract = nnx.eval_shape(lambda: Bagel(model_cfg, rngs=nnx.Rngs(0)))
    abstract.rebuild_tables()
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    dtype = jnp.dtype(model_cfg.dtype)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), params)
    model = nnx.merge(graphdef, params, rest)
    ae = nnx.eval_shape(lambda: build_autoencoder(model_cfg.autoencoder, rngs=nnx.Rngs(1)))
    return IRGProgram(model, ae, mesh, rules)


def _abstract(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


class _Phases:
    """The loop's phases as separate jitted programs over the program's (abstract) state."""

    def __init__(self, program: IRGProgram, static, dyn):
        self.p, self.static, self.dyn = program, static, dyn
        self.pl = program.placement

    def _merge(self, model_state, ae_state):
        return nnx.merge(self.p.model_graph, model_state), nnx.merge(self.p.ae_graph, ae_state)

    def think(self, ms, aes, dyn, sys_ids, sys_len, p_ids, p_len, keys):
        model, _ = self._merge(ms, aes)
        return irg_loop.think_phase(model, self.static, dyn, sys_ids, sys_len, p_ids, p_len, keys)

    def image(self, ms, aes, dyn, cond, sys_only, noise):
        model, ae = self._merge(ms, aes)
        return irg_loop.image_phase(model, ae, self.static, dyn, [cond, sys_only.view(cond)], noise)

    def reflect(self, ms, aes, dyn, cond, image, keys):
        model, ae = self._merge(ms, aes)
        return irg_loop.reflect_phase(model, ae, self.static, dyn, cond, image, keys, 1)

    def refine(self, ms, aes, dyn, cond, before_reflection, before_image, think, fed_back, keys):
        model, ae = self._merge(ms, aes)
        return irg_loop.refine_phase(model, ae, self.static, dyn, cond, before_reflection, before_image, think,
                                     fed_back, keys, 1)

    def lower(self, name: str, *row_args):
        """(lowered, abstract outputs with their row shardings) of phase ``name``."""
        fn = getattr(self, name)
        args = (self.p.model_state, self.p.ae_state, self.pl.put_replicated(self.dyn)) + tuple(
            self.pl.put(row_args, self.pl.row_shardings(row_args)))
        with self.pl.context():
            lowered = jax.jit(fn).lower(*args)
            out = jax.eval_shape(fn, *args)
        out = jax.tree.map(_abstract, out)
        return lowered, self.pl.put(out, self.pl.row_shardings(out))


def _memory(lowered, compiler_options: dict | None = None, weight_shapes: frozenset = frozenset()) -> ProgramMemory:
    """Compile and read the memory; the largest values are tagged ``weight`` when shaped like a
    parameter (the parameters themselves or XLA:CPU's fp32 copies of them)."""
    t0 = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options) if compiler_options else lowered.compile()
    seconds = time.perf_counter() - t0
    try:
        hlo = compiled.as_text()
    except Exception:  # some backends cannot print the optimised module
        hlo = ""
    m = compiled.memory_analysis()
    return ProgramMemory(int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes),
                         int(m.temp_size_in_bytes), int(m.generated_code_size_in_bytes),
                         [dict(v, weight=tuple(v["shape"]) in weight_shapes) for v in largest_values(hlo, top=48)],
                         seconds)


# ------------------------------------------------------------------ the plan

def plan_generation(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | int | None = None, *,
                    mesh: dict[str, int] | None = None, rules=None, inference: InferenceConfig | None = None,
                    batch_size: int | None = None, system_tokens: int = 256,
                    programs: Sequence[str] = PROGRAMS, hoist_converts: bool = True) -> GenerationPlan:
    """Compile the IRG generation programs for ``devices`` and collect per-device memory.

    ``config``: a training config (its ``model``, ``mesh`` and ``sharding.rules`` are used) or a
    model config (e.g. ``irg_jax.model.config.bagel_7b_mot()``; mesh ``data=1,fsdp=-1``, the
    default rules). ``devices``: a list, a count (the first N), or None (all). ``mesh`` (axis
    sizes) and ``rules`` override the config's. ``inference``: sampling settings (default:
    IRG's at the model's default image size). ``batch_size``: prompts (default: one per
    data-parallel rank). ``programs``: a subset of :data:`PROGRAMS`.

    ``hoist_converts=False`` compiles without XLA's while-loop-invariant code motion. XLA:CPU
    runs bf16 dots in fp32: it converts every bf16 weight (and a loop-invariant KV cache) to
    fp32 and, with that pass on, hoists the converts out of the decode and sampling loops, so
    fp32 copies of all weights stay alive. GPUs and TPUs multiply bf16 natively and have no
    such copies; with the pass off the converts stay per layer inside the loops, which is the
    closer estimate for them.
    """
    from irg_jax.parallel.mesh import build_mesh

    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise ValueError(f"programs {unknown}: expected a subset of {PROGRAMS}")
    model_cfg = _model_config(config)
    devices = _devices(devices)
    shape = dict(mesh or (config.mesh if "mesh" in config else DEFAULT_MESH))
    if rules is None and "sharding" in config:
        rules = config.sharding.rules
    device_mesh = build_mesh(shape, devices)
    program = abstract_program(model_cfg, device_mesh, rules)
    pl = program.placement
    if inference is None:
        size = _default_size(model_cfg)
        inference = InferenceConfig(image_size=(size, size))
    static, dyn = inference.static(), inference.dynamic()
    batch = batch_size or pl.data_parallel
    rows = pl.padded(batch)
    grid = feedback.image_grid(model_cfg, *static.image_size, static.vit_max_size, static.vit_min_size)
    sys_w, prompt_w = system_tokens + 2, inference.max_prompt_tokens + 2
    capacity = irg_loop.cache_capacity(model_cfg, static, sys_w, prompt_w)

    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    keys = jax.ShapeDtypeStruct((rows,), jax.random.key(0).dtype)
    inputs = (i32(rows, sys_w), i32(rows), i32(rows, prompt_w), i32(rows), keys)
    memory: dict[str, ProgramMemory] = {}
    options = None if hoist_converts else {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
    _, params, tables = nnx.split(nnx.merge(program.model_graph, program.model_state), nnx.Param, ...)
    weights = frozenset(s for x in jax.tree.leaves(params) for s in (tuple(x.shape), x.sharding.shard_shape(x.shape)))
    phases = _Phases(program, static, dyn)
    needs = {"think": 0, "image": 1, "reflect": 2, "refine": 3}
    last = max((needs[p] for p in programs if p in needs), default=-1)
    if last >= 0:
        lowered, (cond, sys_only, think) = phases.lower("think", *inputs)
        if "think" in programs:
            memory["think"] = _memory(lowered, options, weights)
    if last >= 1:
        noise = jax.ShapeDtypeStruct((rows, grid.num_latent_tokens, latent_token_dim(model_cfg)), jnp.float32)
        lowered, (_, image) = phases.lower("image", cond, sys_only, noise)
        if "image" in programs:
            memory["image"] = _memory(lowered, options, weights)
    if last >= 2:
        lowered, (cond2, before_reflection, fed_back, think2) = phases.lower("reflect", cond, image, keys)
        if "reflect" in programs:
            memory["reflect"] = _memory(lowered, options, weights)
    if last >= 3:
        lowered, _ = phases.lower("refine", cond2, before_reflection, cond, think2, fed_back, keys)
        if "refine" in programs:
            memory["refine"] = _memory(lowered, options, weights)
    if "loop" in programs:
        memory["loop"] = _memory(program.lower(static, dyn, *inputs), options, weights)

    cache_shape = (model_cfg.llm.num_layers, rows, capacity, model_cfg.llm.num_kv_heads, model_cfg.llm.head_dim)
    cache = jax.ShapeDtypeStruct(cache_shape, jnp.dtype(model_cfg.dtype), sharding=pl.cache_sharding(cache_shape))
    state_bytes = dict(params=shard_bytes(params), autoencoder=shard_bytes(program.ae_state),
                       tables=shard_bytes(tables), kv_cache_per_context=2 * shard_bytes(cache))
    return GenerationPlan(
        num_devices=len(devices), mesh=dict(device_mesh.shape), batch_size=batch, rows=rows,
        rows_per_device=rows // pl.data_parallel, image_size=tuple(static.image_size), num_steps=static.num_steps,
        max_think_tokens=static.max_think_tokens, num_refinements=static.num_refinements,
        cfg_contexts=3 if static.num_refinements else 2, system_tokens=system_tokens,
        prompt_tokens=inference.max_prompt_tokens, cache_capacity=capacity, latent_tokens=grid.num_latent_tokens,
        vit_tokens=grid.num_vit_tokens if model_cfg.vit.enabled else 0,
        param_count=int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))), param_dtype=str(model_cfg.dtype),
        state_bytes=state_bytes, programs=memory, hoist_converts=hoist_converts)


def _default_size(model_cfg) -> int:
    from irg_jax.inference.runner import default_image_size
    return default_image_size(model_cfg)


# ------------------------------------------------------------------ report

def _size(n: float) -> str:
    return f"{n / GiB:9.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:9.2f} MiB"


def format_generation_plan(plan: GenerationPlan, largest: int = 8) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in plan.mesh.items())
    h, w = plan.image_size
    lines = [
        f"generation plan: {plan.num_devices} devices, mesh {mesh}; {plan.batch_size} prompts -> {plan.rows} rows "
        f"({plan.rows_per_device} per device)",
        f"IRG settings: think <= {plan.max_think_tokens} tokens, {h}x{w} images ({plan.latent_tokens} latent + "
        f"{plan.vit_tokens} ViT tokens), {plan.num_steps} steps, {plan.num_refinements} refinement(s), "
        f"{plan.cfg_contexts} CFG contexts; system {plan.system_tokens} + prompt {plan.prompt_tokens} tokens; "
        f"KV cache {plan.cache_capacity} slots per context",
        f"parameters: {plan.param_count / 1e6:,.1f} M in {plan.param_dtype}",
        "",
        "state per device (from the shardings)",
    ]
    lines += [f"  {k:<24}{_size(v)}" for k, v in plan.state_bytes.items()]
    names = list(plan.programs)
    how = "" if plan.hoist_converts else ", without while-loop-invariant code motion"
    lines += ["", f"compiled memory per device (memory_analysis{how})",
              "  " + f"{'':<16}" + "".join(f"{n:>13}" for n in names)]
    for field in ("arguments", "outputs", "aliased", "temporaries", "generated_code", "peak"):
        lines.append("  " + f"{field:<16}" + "".join(f"{_size(getattr(plan.programs[n], field)):>13}" for n in names))
    lines.append("  " + f"{'compile (s)':<16}" + "".join(f"{plan.programs[n].compile_seconds:>13.1f}" for n in names))
    for n in names:
        values = plan.programs[n].largest_values
        lines += ["", f"largest arrays of '{n}' (values of the program, not all alive at once)"]
        for tag, rows in (("weight-shaped (parameters, fp32 copies)", [v for v in values if v["weight"]][:3]),
                          ("other", [v for v in values if not v["weight"]][:largest])):
            lines.append(f"  {tag}:")
            for v in rows:
                shape = f"{v['dtype']}[{','.join(map(str, v['shape']))}]"
                lines.append(f"    {_size(v['bytes'])}  x{v['count']:<4d} {shape:<36} {v['op'][-56:]}")
    return "\n".join(lines)


# ------------------------------------------------------------------ command line

def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m irg_jax.inference.plan", description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, required=True, help="simulated CPU devices")
    p.add_argument("--mesh", default="", help="e.g. data=1,fsdp=8,tensor=1 (default: the config's)")
    p.add_argument("--model", choices=("7b", "tiny"), default="7b", help="model sizes (without --train_config)")
    p.add_argument("--train_config", default=None, help="training config path.py[:arg] (model, mesh, rules)")
    p.add_argument("--batch_size", type=int, default=None, help="prompts (default: the data-parallel size)")
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--max_think_tokens", type=int, default=InferenceConfig.max_think_tokens)
    p.add_argument("--num_steps", type=int, default=InferenceConfig.num_steps)
    p.add_argument("--system_tokens", type=int, default=256)
    p.add_argument("--programs", default=",".join(PROGRAMS))
    p.add_argument("--no_hoist", action="store_true",
                   help="compile without while-loop-invariant code motion (no hoisted fp32 weight copies of "
                        "XLA:CPU; the closer estimate for GPU/TPU)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    from irg_jax.parallel.mesh import parse_mesh, simulate_host_devices
    simulate_host_devices(args.devices)  # before JAX starts its backend
    from irg_jax.model import config as model_config
    if args.train_config:
        from irg_jax.config import load_config_file
        config = load_config_file(args.train_config)
    else:
        config = model_config.bagel_7b_mot() if args.model == "7b" else model_config.tiny()
    mesh = parse_mesh(args.mesh) if args.mesh else None
    if mesh:
        mesh = {a: mesh.get(a, 1) for a in DEFAULT_MESH}
    size = args.image_size or _default_size(_model_config(config))
    inference = InferenceConfig(image_size=(size, size), max_think_tokens=args.max_think_tokens,
                                num_steps=args.num_steps)
    plan = plan_generation(config, args.devices, mesh=mesh, inference=inference, batch_size=args.batch_size,
                           system_tokens=args.system_tokens, programs=tuple(filter(None, args.programs.split(","))),
                           hoist_converts=not args.no_hoist)
    print(format_generation_plan(plan))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(plan.to_json(), argv=sys.argv), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
