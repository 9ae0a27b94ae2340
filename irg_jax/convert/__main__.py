"""Convert BAGEL / IRG PyTorch checkpoints to and from irg_jax params checkpoints.

  python -m irg_jax.convert bagel-to-orbax SRC_DIR DST_DIR [--dtype float32|bfloat16] [--scan-layers] [--shard]
  python -m irg_jax.convert orbax-to-bagel CKPT_DIR DST_DIR [--dtype float32|bfloat16] [--no-tables]
                                           [--max-shard-mib MIB]

SRC_DIR may hold the state dict as one file (ema.safetensors, model.safetensors,
ema_bf16.safetensors) or split into shards with an index json (STEM.safetensors.index.json
+ STEM-0000i-of-0000n.safetensors, the Hugging Face layout). The model config written to
DST_DIR/model_config.json is what training's checkpoint.init_from compares its config with.

Errors (a config json value the model cannot represent, unused or missing keys, shape
mismatches, config values that contradict the weights, missing or unreadable files) are
printed without a traceback and the exit status is 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from absl import app, flags, logging

NO_TABLES_HELP = (
    "leave out the two fixed sin-cos tables (latent_pos_embed.pos_embed, vit_pos_embed.pos_embed). "
    "The output then FAILS IRG's official fine-tune loader (FSDPCheckpoint.try_load_ckpt): it pops both "
    "keys from the loaded state dict without a default, so their absence is a KeyError before any weight "
    "is loaded. irg_jax reads it (the tables are rebuilt from the config); keep the tables for IRG's "
    "training scripts")
SHARD_HELP = (
    "split the state dict into shards of at most MIB MiB of tensor data: ema-0000i-of-0000n.safetensors "
    "plus ema.safetensors.index.json (weight_map, metadata.total_size), read by Hugging Face / accelerate "
    "loaders given the index and by bagel-to-orbax. The official BAGEL/IRG scripts open ema.safetensors by "
    "name; leave this out for them (default: one ema.safetensors)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m irg_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("bagel-to-orbax", help="BAGEL/IRG PyTorch folder -> irg_jax params checkpoint")
    a.add_argument("src", help="folder with ema.safetensors (or model.safetensors / ema_bf16.safetensors, or "
                               "any of them sharded with a STEM.safetensors.index.json), llm_config.json, "
                               "vit_config.json, ae.safetensors, tokenizer files")
    a.add_argument("dst", help="output folder (params/, model_config.json, export.json, tokenizer/, ae.safetensors)")
    a.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="stored parameter dtype")
    a.add_argument("--scan-layers", action="store_true",
                   help="stack the decoder layers (for training configs with model.scan_layers=True)")
    a.add_argument("--shard", action="store_true",
                   help="place each parameter on an fsdp mesh over all local devices as it is read "
                        "(keeps host memory low on accelerator machines; not about sharded files)")
    b = sub.add_parser("orbax-to-bagel", help="irg_jax params checkpoint -> BAGEL folder for the PyTorch code")
    b.add_argument("ckpt", help="params checkpoint folder (bagel-to-orbax output or a run's WORKDIR/export)")
    b.add_argument("dst", help="output folder (ema.safetensors, llm/vit/bagel/ae config json, ae.safetensors)")
    b.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of ema.safetensors")
    b.add_argument("--no-tables", action="store_true", help=NO_TABLES_HELP)
    b.add_argument("--max-shard-mib", type=float, default=None, metavar="MIB", help=SHARD_HELP)
    for s in (a, b):
        s.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _parse(argv: list[str]) -> argparse.Namespace:
    flags.FLAGS(argv[:1])  # absl flags (logging) keep their defaults
    args = _parser().parse_args(argv[1:])
    if getattr(args, "max_shard_mib", None) is not None and not args.max_shard_mib > 0:
        _parser().error(f"--max-shard-mib must be positive, got {args.max_shard_mib}")
    return args


def main(args: argparse.Namespace) -> None:
    from irg_jax import convert, runtime
    from irg_jax.convert.errors import ConvertError
    from irg_jax.model.config import BagelConfigError
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
            max_bytes = None if args.max_shard_mib is None else max(1, int(args.max_shard_mib * 2**20))
            out = convert.orbax_to_bagel(args.ckpt, args.dst, dtype=args.dtype, include_tables=not args.no_tables,
                                         max_shard_bytes=max_bytes, progress=not args.no_progress)
    except (ConvertError, BagelConfigError, FileNotFoundError, NotADirectoryError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(out)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
