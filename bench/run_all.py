"""``make bench``: every CPU benchmark with the settings BENCHMARKS.md reports, one after the other.

Writes a small synthetic world to a temporary folder for the train-step benchmark.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(args: list[str]) -> None:
    print(f"\n$ {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))


def main() -> None:
    with tempfile.TemporaryDirectory() as world:
        run(["-m", "irg_jax.synthetic.world", "--out", world, "--num", "2000", "--seed", "0"])
        run([os.path.join(HERE, "train_step.py"), "--data", world])
        run([os.path.join(HERE, "train_step.py"), "--data", world,
             "model.attention.block_q=512", "model.attention.block_k=512"])
    run([os.path.join(HERE, "data_pipeline.py")])  # IRG's toy data at IRG's geometry
    run([os.path.join(HERE, "model_train_step.py"), "--config", "demo"])
    run([os.path.join(HERE, "inference.py"), "--config", "demo"])


if __name__ == "__main__":
    main()
