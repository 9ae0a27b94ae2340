"""Convert BAGEL / IRG PyTorch checkpoints to and from irg_jax params checkpoints.

  python -m irg_jax.convert bagel-to-orbax SRC_DIR DST_DIR [--dtype float32|bfloat16] [--scan-layers] [--shard]
  python -m irg_jax.convert orbax-to-bagel CKPT_DIR DST_DIR [--dtype float32|bfloat16] [--no-tables]

Validation problems (unused or missing keys, shape mismatches, config json values that
contradict the weights) are printed together and the exit status is 2.
"""
from __future__ import annotations

import argparse
import sys

from absl import app, flags, logging


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m irg_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("bagel-to-orbax", help="BAGEL/IRG PyTorch folder -> irg_jax params checkpoint")
    a.add_argument("src", help="folder with ema.safetensors (or model.safetensors / ema_bf16.safetensors), "
                               "llm_config.json, vit_config.json, ae.safetensors, tokenizer files")
    a.add_argument("dst", help="output folder (params/, model_config.json, export.json, tokenizer/, ae.safetensors)")
    a.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="stored parameter dtype")
    a.add_argument("--scan-layers", action="store_true",
                   help="stack the decoder layers (for training configs with model.scan_layers=True)")
    a.add_argument("--shard", action="store_true",
                   help="place each parameter on an fsdp mesh over all local devices as it is read "
                        "(keeps host memory low on accelerator machines)")
    b = sub.add_parser("orbax-to-bagel", help="irg_jax params checkpoint -> BAGEL folder for the PyTorch code")
    b.add_argument("ckpt", help="params checkpoint folder (bagel-to-orbax output or a run's WORKDIR/export)")
    b.add_argument("dst", help="output folder (ema.safetensors, llm/vit/bagel/ae config json, ae.safetensors)")
    b.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of ema.safetensors")
    b.add_argument("--no-tables", action="store_true", help="leave out the two fixed sin-cos tables")
    for s in (a, b):
        s.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _parse(argv: list[str]) -> argparse.Namespace:
    flags.FLAGS(argv[:1])  # absl flags (logging) keep their defaults
    return _parser().parse_args(argv[1:])


def main(args: argparse.Namespace) -> None:
    from irg_jax import convert, runtime
    logging.set_verbosity(logging.INFO)
    runtime.quiet_library_logs()
    try:
        if args.command == "bagel-to-orbax":
            mesh = None
            if args.shard:
                from irg_jax.parallel.mesh import build_mesh
                mesh = build_mesh({"data": 1, "fsdp": -1, "tensor": 1})
            out = convert.bagel_to_orbax(args.src, args.dst, dtype=args.dtype, scan_layers=args.scan_layers,
                                         mesh=mesh, progress=not args.no_progress)
        else:
            out = convert.orbax_to_bagel(args.ckpt, args.dst, dtype=args.dtype, include_tables=not args.no_tables,
                                         progress=not args.no_progress)
    except (convert.CheckpointMismatch, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(out)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
