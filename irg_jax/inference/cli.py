"""The command-line machinery shared by ``python -m irg_jax.generate`` and
``python -m irg_jax.inference.benchmarks``: flags, one-line errors, start-up, the runner the
flags ask for, and the files a result is written as."""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

from irg_jax.config.schema import DEFAULT_RULES, FSDP_TENSOR_RULES
from irg_jax.inference.irg_loop import InferenceConfig, TurnGuidance

RULE_SETS = {"default": DEFAULT_RULES, "fsdp_tensor": FSDP_TENSOR_RULES}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2): no usage block above the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# Exceptions that mean bad input (files, flags, prompts, checkpoints): exit 2 without a traceback.
INPUT_ERRORS = (ValueError, OSError, KeyError)


def one_line(error: BaseException) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " | ".join(part.strip() for part in text.splitlines() if part.strip()) or type(error).__name__


def run_cli(prog: str, debug: bool, body) -> int:
    """Run ``body()`` (returns the exit code); an exception becomes one line on stderr and exit 2
    (:data:`INPUT_ERRORS`) or 1 (anything else), or propagates with its traceback when ``debug``."""
    try:
        return body()
    except Exception as e:  # noqa: BLE001 - the CLI's single error exit
        if debug:
            raise
        if isinstance(e, INPUT_ERRORS):
            print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
            return 2
        print(f"{prog}: internal error: {type(e).__name__}: {one_line(e)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


def start_up(args):
    """First thing after parsing the flags, before any JAX computation: the multi-process runtime
    and the persistent compilation cache (JAX reads ``JAX_COMPILATION_CACHE_DIR`` only at import)."""
    from irg_jax import runtime
    runtime.maybe_initialize_distributed()
    return runtime.setup_compilation_cache(args.compilation_cache)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    d = InferenceConfig()
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    p.add_argument("--compilation_cache", default=None,
                   help="persistent compilation cache directory (default: $JAX_COMPILATION_CACHE_DIR or "
                        "./.cache/jax; '' turns it off)")
    p.add_argument("--checkpoint", required=True, help="export directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir/file (default: DIR/tokenizer)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="prompts per compiled batch (default: the data-parallel size of the mesh)")
    p.add_argument("--mesh", default=None,
                   help="device mesh, e.g. data=2,fsdp=4,tensor=1 (-1 fills the rest; default: data=1,fsdp=-1,tensor=1 "
                        "or the mesh of --train_config)")
    p.add_argument("--rules", choices=sorted(RULE_SETS), default=None,
                   help="logical-axis sharding rules (default: 'default', or sharding.rules of --train_config)")
    p.add_argument("--train_config", default=None,
                   help="a training config file (path.py[:arg]) whose mesh and sharding.rules to use")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_size", type=int, nargs="+", default=None,
                   help="H [W] in pixels (default: 1024, or the largest the model's latent table allows)")
    p.add_argument("--num_steps", type=int, default=d.num_steps)
    p.add_argument("--timestep_shift", type=float, default=d.timestep_shift)
    p.add_argument("--max_think_tokens", type=int, default=d.max_think_tokens)
    p.add_argument("--max_prompt_tokens", type=int, default=d.max_prompt_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="<= 0: greedy")
    p.add_argument("--top_k", type=int, default=d.top_k)
    p.add_argument("--top_p", type=float, default=d.top_p)
    p.add_argument("--cfg_text", type=float, default=d.turn1.text_scale, help="turn 1 text scale")
    p.add_argument("--cfg_interval", type=float, nargs=2, default=d.turn1.interval, help="turn 1 CFG interval")
    p.add_argument("--cfg_renorm", default=d.turn1.renorm, help="turn 1 renorm type")
    p.add_argument("--refine_cfg_text", type=float, default=d.refine.text_scale)
    p.add_argument("--refine_cfg_img", type=float, default=d.refine.img_scale)
    p.add_argument("--refine_cfg_interval", type=float, nargs=2, default=d.refine.interval)
    p.add_argument("--refine_cfg_renorm", default=d.refine.renorm)
    p.add_argument("--cfg_renorm_min", type=float, default=d.renorm_min)
    p.add_argument("--refine_start", type=float, default=d.refine_start,
                   help="t in (0, 1] where a refined image starts: 1 = from noise (IRG); s < 1 = from "
                        "s*noise + (1-s)*previous image")
    p.add_argument("--refine_timestep_shift", type=float, default=None,
                   help="schedule shift of refined images (default: --timestep_shift); with --refine_start s "
                        "the schedule is s times the shifted one")
    p.add_argument("--num_refinements", type=int, default=d.num_refinements)
    p.add_argument("--system_prompt", default=None, help="text or @FILE (default: IRG's, paraphrased)")
    p.add_argument("--vit_max_size", type=int, default=None, help="ViT copy of a fed-back image (default 980)")
    p.add_argument("--vit_min_size", type=int, default=None, help="(default 224; both capped at the ViT table)")


def inference_config(args, model_cfg) -> InferenceConfig:
    from irg_jax.inference.runner import default_image_size
    size = args.image_size or [default_image_size(model_cfg)]
    if len(size) not in (1, 2):
        raise ValueError(f"--image_size takes H or H W, got {size}")
    system = InferenceConfig.system_prompt
    if args.system_prompt:
        system = (pathlib.Path(args.system_prompt[1:]).read_text(encoding="utf-8")
                  if args.system_prompt.startswith("@") else args.system_prompt)
    return InferenceConfig(
        image_size=(size[0], size[-1]), num_steps=args.num_steps, timestep_shift=args.timestep_shift,
        max_think_tokens=args.max_think_tokens, max_prompt_tokens=args.max_prompt_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        turn1=TurnGuidance(args.cfg_text, 1.0, tuple(args.cfg_interval), args.cfg_renorm),
        refine=TurnGuidance(args.refine_cfg_text, args.refine_cfg_img, tuple(args.refine_cfg_interval),
                            args.refine_cfg_renorm),
        renorm_min=args.cfg_renorm_min, refine_start=args.refine_start,
        refine_timestep_shift=args.refine_timestep_shift, num_refinements=args.num_refinements,
        system_prompt=system, vit_max_size=args.vit_max_size, vit_min_size=args.vit_min_size)


def mesh_and_rules(args, devices=None):
    """The device mesh and sharding rules the flags ask for (same options as training)."""
    import jax
    from irg_jax.config import base_config, load_config_file
    from irg_jax.parallel.mesh import build_mesh
    from irg_jax.parallel.mesh import parse_mesh

    train = load_config_file(args.train_config) if args.train_config else base_config()
    shape = dict(train.mesh)
    if args.mesh:
        try:
            shape = {a: 1 for a in shape} | parse_mesh(args.mesh)
        except ValueError as e:
            raise ValueError(f"--mesh: {e}") from None
    rules = RULE_SETS[args.rules] if args.rules else tuple(tuple(r) for r in train.sharding.rules)
    try:
        return build_mesh(shape, devices), rules
    except ValueError as e:
        raise ValueError(f"--mesh: {e} ({len(devices or jax.devices())} devices)") from None


def build_runner(args, devices=None, prompts=None, where=None):
    """The runner the flags ask for; ``prompts`` (named by ``where``) are checked before the
    parameters are restored (``irg_jax.inference.runner.from_checkpoint``)."""
    from irg_jax.inference import runner
    from irg_jax.inference.placement import Placement
    from irg_jax.convert.params_dir import load_model_config
    config = inference_config(args, load_model_config(args.checkpoint))
    mesh, rules = mesh_and_rules(args, devices)
    batch_size = args.batch_size or Placement.make(mesh, rules).data_parallel
    return runner.from_checkpoint(args.checkpoint, config, batch_size, args.tokenizer, mesh=mesh, rules=rules,
                                  prompts=prompts, where=where)


def settings_record(runner, seed: int) -> dict:
    record = {"seed": seed, "batch_size": runner.batch_size, **dataclasses.asdict(runner.config)}
    placement = getattr(getattr(runner, "program", None), "placement", None)
    if placement is not None:
        record["mesh"] = dict(placement.mesh.shape)
    return record


def is_writer() -> bool:
    """Process 0 writes the files (every process runs the generation)."""
    import jax
    return jax.process_index() == 0


def write_turns(folder: pathlib.Path, result, prefix: str = "turn", suffix: str = "") -> None:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for k, turn in enumerate(result.turns, 1):
        Image.fromarray(turn.image).save(folder / f"{prefix}{k}{suffix}.png")
        (folder / f"{prefix}{k}{suffix}.txt").write_text(turn.text, encoding="utf-8")
