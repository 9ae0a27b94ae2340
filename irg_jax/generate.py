"""IRG generation: ``python -m irg_jax.generate --checkpoint DIR (--prompt TEXT | --prompts FILE) --out DIR``.

DIR is an export directory (``DIR/params``, ``DIR/model_config.json``, ``DIR/tokenizer/``,
``DIR/ae.safetensors`` for a FLUX autoencoder). For prompt ``i`` it writes

    <out>/<i>/turn1.png, turn1.txt       think 1 and image 1
    <out>/<i>/turn2.png, turn2.txt       the reflection and the refined image (one per round)
    <out>/<i>/result.json                prompt, texts, seed, row id and every sampling setting

``--prompts FILE``: one prompt per line, or JSON lines with a ``prompt`` field. All
defaults are IRG's (spec §6.6); the whole loop of a batch is one compiled program.

Devices: the same mesh options as training. ``--mesh data=..,fsdp=..,tensor=..`` (default:
the training default, every device on ``fsdp``; or the ``mesh`` of ``--train_config``) and
the logical-axis rules (``--rules``, or ``sharding.rules`` of ``--train_config``): the
parameters are restored sharded by the rules, the prompt rows split over ``('data',
'fsdp')``; a batch that the data-parallel size does not divide is padded (the padding is
dropped). ``--batch_size`` defaults to the data-parallel size. Under multi-process JAX every
process runs this command with the same arguments; process 0 writes the files.

Every prompt is checked before the parameters are loaded: an empty prompt, or one longer
than the bucket's ``--max_prompt_tokens``, is an error naming its line and length, and
nothing is generated. Errors are one line on stderr (exit 2 for bad input and flags, 1 for
anything else); ``--debug`` shows the traceback instead. Compiled programs are kept in the
persistent compilation cache (``--compilation_cache``, default ``$JAX_COMPILATION_CACHE_DIR``
or ``./.cache/jax``), so a second run on the same export and settings compiles nothing; the
last line on stderr says how many programs were loaded from the cache and how many compiled.
"""
from __future__ import annotations

import json
import pathlib
import sys

from irg_jax.inference.cli import (ArgumentParser, add_sampling_flags, build_runner, is_writer, run_cli,
                                   settings_record, start_up, write_turns)

def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m irg_jax.generate", description=__doc__.split("\n")[0])
    add_sampling_flags(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="file: one prompt per line, or JSON lines with a 'prompt' field")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    return run_cli(p.prog, args.debug, lambda: generate(args))


def generate(args) -> int:
    from irg_jax import runtime
    start_up(args)
    from irg_jax.inference.runner import Prompt, read_prompt_file
    if args.prompt is not None:
        prompts = [Prompt(args.prompt, "--prompt")]
    else:
        prompts = read_prompt_file(args.prompts)
        if not prompts:
            raise ValueError(f"{args.prompts}: no prompts")
    texts, where = [q.text for q in prompts], [q.where for q in prompts]
    with runtime.CompileStats() as compiles:
        runner = build_runner(args, prompts=texts, where=where)
        out = pathlib.Path(args.out)
        settings = settings_record(runner, args.seed)
        done = 0
        for batch in runner.run(texts, args.seed, progress=is_writer(), where=where):
            if not is_writer():
                continue
            for result in batch:
                folder = out / str(result.row_id)
                write_turns(folder, result)
                record = {"index": result.row_id, "prompt": result.prompt,
                          "turns": [{"text": t.text, "num_tokens": t.num_tokens, "ended_with_eos": t.ended,
                                     "image": f"turn{k}.png"} for k, t in enumerate(result.turns, 1)],
                          "settings": settings}
                (folder / "result.json").write_text(json.dumps(record, indent=2, ensure_ascii=False),
                                                    encoding="utf-8")
                done += 1
    if is_writer():
        print(f"wrote {done} results to {out}", file=sys.stderr)
        print(compiles.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
