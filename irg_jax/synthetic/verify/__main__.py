"""CLI: ``python -m irg_jax.synthetic.verify RESULTS_DIR`` writes ``RESULTS_DIR/scores.json`` and prints a table."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from irg_jax.synthetic import scenes
from irg_jax.synthetic.verify.results import format_table, score_results
from irg_jax.synthetic.verify.scene_parser import ParserConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Score generated images of the synthetic world with the verifier.")
    p.add_argument("results_dir", help="folder of per-prompt folders (result.json, turn1.png, turn2.png, ...)")
    p.add_argument("--world", help="world.json written by irg_jax.synthetic.world (takes its colours)")
    p.add_argument("--colours", help=f"comma-separated palette colours (default {','.join(scenes.DEFAULT_COLOURS)})")
    p.add_argument("--position-margin", type=float, default=0.1, help="share of the image width")
    p.add_argument("--out", help="where to write the scores (default RESULTS_DIR/scores.json)")
    args = p.parse_args(argv)
    colours = scenes.DEFAULT_COLOURS
    if args.world:
        colours = tuple(json.loads(pathlib.Path(args.world).read_text())["config"]["colours"])
    if args.colours:
        colours = tuple(c.strip() for c in args.colours.split(",") if c.strip())
    unknown = [c for c in colours if c not in scenes.PALETTE]
    if unknown:
        p.error(f"unknown colours {unknown}; known: {list(scenes.PALETTE)}")
    scores = score_results(args.results_dir, ParserConfig(colours=colours), args.position_margin, args.out)
    print(format_table(scores))
    for turn, summary in scores["turns"].items():
        for key, change in summary.items():
            if key.startswith("vs_"):
                print(f"{turn} {key}: fixed {change['fixed']}, broken {change['broken']} of {change['prompts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
