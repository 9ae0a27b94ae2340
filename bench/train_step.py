"""Benchmark: the real IRGL train step on real packs (synthetic world), vs a large fp32 matmul.

    python -m irg_jax.synthetic.world --out /tmp/world --num 2000 --seed 0
    .venv/bin/python bench/train_step.py --data /tmp/world [--variant demo] [--steps 5] \
        [model.attention.block_q=512 model.attention.block_k=512 ...]

Runs the loop's step (``irg_jax.train.setup.train_setup``: the same state, batch and constant
shardings, donated state; config ``configs/irgl_stage1.py:<variant>``, Grain pipeline) on one
CPU device and reports seconds per step (a) on batches fetched beforehand and (b) fetching each batch in the loop, tokens/s over the
pack budget, and the analytic model FLOP/s as a fraction of an fp32 matmul timed in the same
process. Trailing ``key=value`` arguments override config keys (ints, floats, strings).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import flags  # noqa: E402

from irg_jax.config.irgl import irgl_config  # noqa: E402
from irg_jax.data import pipeline  # noqa: E402
from irg_jax.data.tokenizer import load_tokenizer  # noqa: E402
from irg_jax.parallel.mesh import build_mesh  # noqa: E402
from irg_jax.train.loop import step_flops  # noqa: E402
from irg_jax.train.mfu import measure_matmul_flops  # noqa: E402
from irg_jax.train.setup import train_setup  # noqa: E402


def override(config, kv: str) -> None:
    key, _, value = kv.partition("=")
    *path, last = key.split(".")
    node = config
    for k in path:
        node = node[k]
    old = node[last]
    node[last] = (value in ("1", "true", "True")) if isinstance(old, bool) else type(old)(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="synthetic world folder (irg_jax.synthetic.world --out)")
    p.add_argument("--variant", default="demo")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    flags.FLAGS.mark_as_parsed()
    c = irgl_config(1, f"{args.variant},data_root={args.data}")
    for kv in args.overrides:
        override(c, kv)
    peak = measure_matmul_flops()
    tokenizer = load_tokenizer(c.data.tokenizer_path)
    setup = train_setup(c, build_mesh(c.mesh))  # the loop's step: same shardings, constants as arguments
    setup.place_constants()
    it, budgets = pipeline.make_train_iterator(c.data, c.model, tokenizer, seed=0, batch_size=c.batch_size,
                                               sharding=setup.batch_sharding)
    flops = step_flops(c, budgets[-1])
    budget_tokens = c.batch_size * (budgets[-1].und_len + budgets[-1].gen_len)
    state, window = setup.create_state(setup.init_params()), setup.new_window(0)
    step = lambda state, batch, window: setup.step(state, batch, window, *setup.constants)  # noqa: E731
    with setup.active():
        t0 = time.perf_counter()
        state, window, _ = step(state, next(it), window)
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - t0
        batches = [next(it) for _ in range(args.steps)]
        t0 = time.perf_counter()
        for b in batches:
            state, window, _ = step(state, b, window)
        jax.block_until_ready(state)
        prefetched = (time.perf_counter() - t0) / args.steps
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, window, _ = step(state, next(it), window)
        jax.block_until_ready(state)
        in_loop = (time.perf_counter() - t0) / args.steps
    print(f"config {args.variant} {' '.join(args.overrides)}")
    print(f"  fp32 matmul reference   {peak / 1e9:.1f} GFLOP/s")
    print(f"  first step (compile)    {compile_s:.1f} s")
    print(f"  step, batches ready     {prefetched:.3f} s  ({budget_tokens / prefetched:.0f} budget tok/s, "
          f"{flops / prefetched / peak:.1%} of the matmul)")
    print(f"  step, fetching batches  {in_loop:.3f} s  ({budget_tokens / in_loop:.0f} budget tok/s, "
          f"{flops / in_loop / peak:.1%} of the matmul)")
    print(f"  data                    {it.metrics()}")
    os._exit(0)  # grain's prefetch threads can hang interpreter shutdown


if __name__ == "__main__":
    main()
