"""Benchmark: training forward+backward of the Bagel model; achieved FLOP/s vs a large fp32 matmul.

    .venv/bin/python bench/model_train_step.py [--config demo|tiny|bagel_7b_mot] [--batch 8] [--steps 10]
        [--layers N] [--dtype float32|bfloat16] [--image_px 32] [--text_len 24]

Each pack is one IRG-style document (think text, noisy target image, its clean copy,
a ViT view of it, reflection text), built with ``tests/_segment_pack.py``. The
model FLOPs are the analytic matmul count (``irg_jax.model.bagel.training_flops``:
3x the forward, one expert per token); XLA's own count of the compiled step is shown
for comparison. The reference is a square fp32 matmul timed in the same process.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the pack builder is a test helper (tests/_segment_pack.py)
from irg_jax.model import config as model_config  # noqa: E402
from irg_jax.model.bagel import Bagel, forward_flops  # noqa: E402
from irg_jax.model.config import latent_token_dim  # noqa: E402
from _segment_pack import pack_from_segments  # noqa: E402


def demo_pack(cfg, image_px: int = 32, text_len: int = 24):
    """One document: text, noisy image, clean copy, ViT view, text."""
    px = cfg.autoencoder.downsample * cfg.latent.patch_size
    n_lat = (image_px // px) ** 2
    n_vit = (image_px // cfg.vit.patch_size) ** 2 if cfg.vit.enabled else 0
    ids = lambda n: [cfg.special_ids.bos] + list(range(1, n - 1)) + [cfg.special_ids.eos]  # noqa: E731
    segments = [(0, "text", ids(text_len)), (0, "noisy", n_lat), (0, "clean", n_lat)]
    segments += [(0, "vit", n_vit)] if n_vit else []
    segments += [(0, "text", ids(text_len))]
    return pack_from_segments(segments, cfg)


def best_time(fn, *args, steps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_flops_per_s(n: int, steps: int, dtype=jnp.float32) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    return 2 * n ** 3 / best_time(jax.jit(jnp.matmul), a, b, steps=steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo", choices=["demo", "tiny", "bagel_7b_mot"])
    parser.add_argument("--layers", type=int, default=0, help="override the LLM and ViT layer counts")
    parser.add_argument("--dtype", default="", help="override the compute dtype")
    parser.add_argument("--attention", default="", help="override model.attention.impl (chunked, dense)")
    parser.add_argument("--block", type=int, default=0, help="override attention block_q and block_k")
    parser.add_argument("--image_px", type=int, default=32)
    parser.add_argument("--text_len", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--matmul", type=int, default=2048, help="side of the reference fp32 matmul")
    args = parser.parse_args()

    cfg = getattr(model_config, args.config)()
    if args.layers:
        cfg.llm.num_layers = cfg.vit.num_layers = args.layers
    if args.dtype:
        cfg.dtype = args.dtype
    if args.attention:
        cfg.attention.impl = args.attention
    if args.block:
        cfg.attention.block_q = cfg.attention.block_k = args.block
    pack, budgets, _ = demo_pack(cfg, args.image_px, args.text_len)
    batch = {k: jnp.asarray(np.repeat(v[None], args.batch, 0)) for k, v in pack.items()}
    batch["latent_t"] = jnp.where(batch["split_mode"][:, budgets.und_len:] == 2, 0.7, 0.0).astype(jnp.float32)
    batch["latent_noisy"] = batch["latent_t"] > 0
    rng = np.random.default_rng(0)
    shape = (args.batch, budgets.gen_len, latent_token_dim(cfg))
    x0 = jnp.asarray(rng.normal(size=shape), jnp.float32)
    noise = jnp.asarray(rng.normal(size=shape), jnp.float32)
    batch["vit_patches"] = jnp.asarray(rng.uniform(-1, 1, size=batch["vit_patches"].shape), jnp.float32)

    model = Bagel(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest, batch, x0, noise):
        out = nnx.merge(graphdef, params, rest)(batch, x0, noise)
        logp = jax.nn.log_softmax(out["ce_logits"], axis=-1)
        ce = -jnp.take_along_axis(logp, batch["ce_labels"][..., None], axis=-1)[..., 0].mean()
        mse = jnp.mean(jnp.square(out["velocity"] - out["target"]), axis=-1)
        return ce + jnp.sum(mse * batch["latent_noisy"]) / jnp.maximum(batch["latent_noisy"].sum(), 1)

    step = jax.jit(jax.value_and_grad(loss_fn))
    inputs = (params, rest, batch, x0, noise)
    xla_flops = step.lower(*inputs).compile().cost_analysis().get("flops", float("nan"))
    fwd = forward_flops(cfg, batch=args.batch, und_len=budgets.und_len, gen_len=budgets.gen_len,
                        vit_len=budgets.vit_len, ce_len=budgets.ce_len)
    model_flops = 3 * fwd["total"]
    step_s = best_time(step, *inputs, steps=args.steps)
    ref = matmul_flops_per_s(args.matmul, steps=max(3, args.steps // 2))
    ref_bf16 = matmul_flops_per_s(args.matmul, steps=max(3, args.steps // 2), dtype=jnp.bfloat16)
    achieved = model_flops / step_s
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    tokens = args.batch * budgets.seq_len

    print(f"| quantity | value |\n|---|---|")
    print(f"| device | {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}) |")
    print(f"| config | {args.config} ({cfg.llm.num_layers} layers), {n_params / 1e6:.2f}M params, "
          f"dtype {cfg.dtype}, remat {cfg.remat}, scan {cfg.scan_layers}, attention {cfg.attention.impl} "
          f"(blocks {cfg.attention.block_q}) |")
    print(f"| batch | {args.batch} packs x {budgets.seq_len} tokens (und {budgets.und_len}, gen {budgets.gen_len}, "
          f"ViT {budgets.vit_len}, CE {budgets.ce_len}) |")
    print(f"| train step (fwd+bwd), median of {args.steps} | {step_s * 1e3:.1f} ms ({tokens / step_s:,.0f} tokens/s) |")
    print(f"| model FLOPs / step (analytic, 3x fwd) | {model_flops / 1e9:.3f} GFLOP |")
    print(f"| XLA cost-analysis FLOPs / step (loop bodies counted once) | {xla_flops / 1e9:.3f} GFLOP |")
    print(f"| achieved | {achieved / 1e9:.2f} GFLOP/s |")
    print(f"| fp32 matmul {args.matmul}^3, same run | {ref / 1e9:.2f} GFLOP/s |")
    print(f"| bf16 matmul {args.matmul}^3, same run | {ref_bf16 / 1e9:.2f} GFLOP/s |")
    print(f"| achieved / fp32 matmul | {achieved / ref:.1%} |")
    print(f"| achieved / bf16 matmul | {achieved / ref_bf16:.1%} |")


if __name__ == "__main__":
    main()
