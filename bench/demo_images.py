"""Benchmark: generation-target images per second of the demo's stage-1 train step, and its real FLOP/s.

    python -m irg_jax.synthetic.world --out /tmp/world --num 4000 --seed 0 --jitter 0
    .venv/bin/python bench/demo_images.py --data /tmp/world [--steps 8] [--stage 1] [key=value ...]

Builds the loop's train step for ``configs/irgl_stage<stage>.py:demo`` (trailing ``key=value``
arguments override config keys, e.g. ``model.attention.block_q=512``) on one CPU device, runs
``--steps`` steps on batches fetched beforehand, and reports:

* images/s: noisy VAE images (generation targets: ``latent_noisy`` tokens / tokens per image)
  per second of step time;
* model FLOP/s (the attention the mask allows) and hardware FLOP/s (the attention tiles the
  blockwise kernel computes), see :mod:`irg_jax.train.mfu`, each as a share of a 2048² fp32
  matmul timed in the same process before and after the steps (the machine may be shared:
  the ratio is the comparable figure, the absolute rates are not).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from irg_jax.config.irgl import irgl_config  # noqa: E402
from irg_jax.data import pipeline  # noqa: E402
from irg_jax.data.tokenizer import load_tokenizer  # noqa: E402
from irg_jax.parallel.mesh import build_mesh  # noqa: E402
from irg_jax.train import mfu as mfu_lib  # noqa: E402
from irg_jax.train.setup import train_setup  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import override  # noqa: E402  (the same KEY=VALUE overrides as bench/train_step.py)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="synthetic world folder (irg_jax.synthetic.world --out)")
    p.add_argument("--stage", type=int, default=1, choices=(1, 2))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    flags.FLAGS.mark_as_parsed()
    c = irgl_config(args.stage, f"demo,data_root={args.data}")
    for kv in args.overrides:
        override(c, kv)
    tokenizer = load_tokenizer(c.data.tokenizer_path)
    setup = train_setup(c, build_mesh(c.mesh))  # the loop's step: same shardings, constants as arguments
    setup.place_constants()
    it, budgets = pipeline.make_train_iterator(c.data, c.model, tokenizer, seed=0, batch_size=c.batch_size,
                                               sharding=setup.batch_sharding)
    px = c.model.autoencoder.downsample * c.model.latent.patch_size
    tokens_per_image = (budgets[-1].vae_image_size[0] // px) * (budgets[-1].vae_image_size[1] // px)
    batches = [next(it) for _ in range(args.steps + 1)]
    images = [float(np.asarray(b["latent_noisy"]).sum()) / tokens_per_image for b in batches[1:]]
    pairs = np.sum([np.asarray(mfu_lib.batch_attention_pairs(b, c.model.attention)) for b in batches[1:]], axis=0)
    state, window = setup.create_state(setup.init_params()), setup.new_window(0)
    with setup.active():
        t0 = time.perf_counter()
        state, window, _ = setup.step(state, batches[0], window, *setup.constants)
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - t0
        times, refs = [], []
        for b in batches[1:]:  # each step next to a matmul reference: the machine's load moves
            refs.append(mfu_lib.measure_matmul_flops(repeats=3))
            t0 = time.perf_counter()
            state, window, _ = setup.step(state, b, window, *setup.constants)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
    step_s, ref = float(np.median(times)), float(np.median(refs))
    work = float(np.median([t * r for t, r in zip(times, refs)]))  # step time x reference rate: load-independent
    flops = mfu_lib.split_flops(c.model, c.batch_size, budgets[-1], float(pairs[0]) / args.steps,
                               float(pairs[1]) / args.steps)
    b0 = budgets[-1]
    out = {
        "overrides": args.overrides, "stage": args.stage, "packs_per_step": c.batch_size,
        "pack": f"und {b0.und_len} + gen {b0.gen_len}, {b0.num_vae_images} VAE images",
        "block": [int(c.model.attention.block_q), int(c.model.attention.block_k)],
        "impl": mfu_lib.resolve_impl(c.model.attention.impl),
        "matmul_ref_gflops": [round(min(refs) / 1e9, 1), round(ref / 1e9, 1), round(max(refs) / 1e9, 1)],
        "compile_s": round(compile_s, 1), "step_s": round(step_s, 3),
        "images_per_step": round(float(np.mean(images)), 2),
        "images_per_s": round(float(np.mean(images)) / step_s, 1),
        "model_gflop_per_step": round(flops["model"] / 1e9, 2),
        "hardware_gflop_per_step": round(flops["hardware"] / 1e9, 2),
        "attention_allowed_share": round(flops["attention_allowed_share"], 4),
        "attention_computed_share": round(flops["attention_computed_share"], 4),
        "model_flops_of_matmul": round(flops["model"] / work, 4),
        "hardware_flops_of_matmul": round(flops["hardware"] / work, 4),
        # images/s scaled to a reference of 200 GFLOP/s (the idle 2-core machine): comparable across loads
        "images_per_s_at_200_gflops": round(float(np.mean(images)) / work * 200e9, 1),
        "data": {k: float(v) for k, v in it.metrics().items() if k in ("data/pad_fraction", "data/in_buffer", "data/dropped")},
    }
    print(json.dumps(out))
    print(f"{' '.join(args.overrides) or 'demo defaults'}: {out['images_per_step']} images/step, "
          f"{out['step_s']} s/step -> {out['images_per_s']} images/s ({out['images_per_s_at_200_gflops']} at a "
          f"200 GFLOP/s reference); model FLOPs {out['model_flops_of_matmul']:.1%}, "
          f"hardware FLOPs {out['hardware_flops_of_matmul']:.1%} of the fp32 matmul "
          f"(reference min/median/max {out['matmul_ref_gflops']} GFLOP/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    os._exit(0)  # grain's prefetch threads can hang interpreter shutdown


if __name__ == "__main__":
    main()
