"""Benchmark: IRG inference — KV-cache decode vs recompute, flow sampler steps/s, whole-loop prompts/s.

    .venv/bin/python bench/inference.py [--config demo|tiny|bagel_7b_mot] [--layers N] [--dtype bfloat16]
        [--contexts 128 512 1024] [--capacities 256 2048 8192] [--decode_tokens 32] [--image_px 64] [--num_steps 8]
        [--batch 1] [--think_tokens 16]

Rows of the table:
  decode ms/token       one token through ``kv_cache.decode_step`` inside the on-device
                        while loop, with L tokens already in a cache of capacity C (context x capacity table)
  recompute @ L         one full forward over all L tokens (what a cache-less decoder pays per token)
  sampler               denoising steps/s of ``generate_latents`` with the three IRG branches in one
                        batched forward (context of 1k tokens)
  IRG loop              the compiled think -> image -> feedback -> reflection -> image program
Random weights: the think texts run to ``--think_tokens`` unless the model samples eos.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from irg_jax.inference import flow, irg_loop, sampling  # noqa: E402
from irg_jax.model import config as model_config, kv_cache  # noqa: E402
from irg_jax.model.autoencoder import build_autoencoder  # noqa: E402
from irg_jax.model.bagel import Bagel  # noqa: E402
from irg_jax.model.config import latent_token_dim  # noqa: E402


def timed(fn, *args, repeats: int = 3) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def timed_donated(fn, state, cache, repeats: int = 3) -> float:
    """Median seconds of ``fn(state, cache)`` whose cache argument is donated: a fresh copy per call,
    made outside the timed region."""
    times = []
    for i in range(repeats + 1):
        fresh = jax.block_until_ready(jax.tree.map(jnp.copy, cache))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(state, fresh))
        if i:  # the first call compiles
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="demo", choices=["demo", "tiny", "bagel_7b_mot"])
    p.add_argument("--layers", type=int, default=0, help="override the LLM and ViT layer counts")
    p.add_argument("--dtype", default="", help="override the compute dtype")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024])
    p.add_argument("--capacities", type=int, nargs="+", default=[256, 2048, 8192],
                   help="KV-cache capacities; each context runs in every capacity it fits")
    p.add_argument("--decode_tokens", type=int, default=32)
    p.add_argument("--image_px", type=int, default=0, help="generated image side (default: model max, <= 1024)")
    p.add_argument("--num_steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--think_tokens", type=int, default=16)
    p.add_argument("--skip_loop", action="store_true")
    args = p.parse_args()

    cfg = getattr(model_config, args.config)()
    if args.layers:
        cfg.llm.num_layers = cfg.vit.num_layers = args.layers
    if args.dtype:
        cfg.dtype = args.dtype
    cfg.remat = False
    model = Bagel(cfg, rngs=nnx.Rngs(0))
    model.llm2vae.kernel.set_value(jax.random.normal(jax.random.key(1), model.llm2vae.kernel.shape) * 0.02)
    graph, state = nnx.split(model)
    # parameters in the compute dtype, as an inference export stores them
    state = jax.tree.map(lambda x: x.astype(cfg.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    b, vocab = args.batch, cfg.llm.vocab_size
    rows = []
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    rows.append(("device", f"{jax.devices()[0].device_kind} ({jax.default_backend()})"))
    rows.append(("model", f"{args.config}, {cfg.llm.num_layers} layers, hidden {cfg.llm.hidden_size}, "
                          f"{n_params / 1e6:,.1f}M params, {cfg.dtype}, batch {b}"))

    longest = max(args.contexts)
    tokens = jax.random.randint(jax.random.key(2), (b, longest), 0, cfg.special_ids.bos)

    @functools.partial(jax.jit, static_argnums=2)
    def prefill(state, ids, capacity):
        m = nnx.merge(graph, state)
        return kv_cache.append_text(m, kv_cache.init_cache(cfg, b, capacity), ids)[0]

    @functools.partial(jax.jit, donate_argnums=1)  # the cache is updated in place, as in the IRG loop
    def decode(state, cache):
        m = nnx.merge(graph, state)
        keys = jax.random.split(jax.random.key(3), b)
        # eos_id -1: never stops early, exactly decode_tokens steps
        c, out = sampling.generate(sampling.model_step_fn(m), cache, jnp.full((b,), cfg.special_ids.bos), keys,
                                   max_tokens=args.decode_tokens, eos_id=-1, settings=sampling.TextSampling(0.3))
        return c, out.ids  # the cache is returned: its donated buffer is updated in place

    @jax.jit
    def recompute(state, ids):  # one row: the cost of one token without a cache
        m = nnx.merge(graph, state)
        cache = kv_cache.init_cache(cfg, 1, ids.shape[1])
        _, hidden = kv_cache.append_text(m, cache, ids)
        return m.decoder.logits(hidden[:, -1])

    # decode cost over context x capacity: one prefill per capacity (the longest context that fits),
    # shorter contexts by setting the rows' length (the compiled decode is the same for every context)
    per_token, table = {}, {}
    for cap in args.capacities:
        fits = [L for L in args.contexts if L + args.decode_tokens <= cap]
        if not fits:
            continue
        cache = prefill(state, tokens[:, :max(fits)], cap)
        for L in fits:
            c = cache._replace(length=jnp.full((b,), L, jnp.int32), rope=jnp.full((b,), L, jnp.int32))
            table[L, cap] = timed_donated(decode, state, c) / args.decode_tokens / b  # per generated token
    for L in args.contexts:
        t = min(table[L, cap] for cap in args.capacities if (L, cap) in table)
        per_token[L] = t
        r = timed(recompute, state, tokens[:1, :L])
        rows.append((f"recompute one row's context @ {L}", f"{r * 1e3:.2f} ms = {r / t:.1f}x one cached token"))
    caps = [c for c in args.capacities if any((L, c) in table for L in args.contexts)]
    decode_table = ["| decode ms/token (batch %d) | " % b + " | ".join(f"capacity {c}" for c in caps) + " |",
                    "|---|" + "---|" * len(caps)]
    for L in args.contexts:
        cells = [f"{table[L, c] * 1e3:.2f}" if (L, c) in table else "" for c in caps]
        decode_table.append(f"| context {L} | " + " | ".join(cells) + " |")

    # sampler: 3 branches over a 1k-token context
    side = args.image_px or min(1024, cfg.latent.max_latent_size * cfg.autoencoder.downsample * cfg.latent.patch_size)
    px = cfg.autoencoder.downsample * cfg.latent.patch_size
    n_lat = (side // px) ** 2
    ctx = min(1024, longest)
    cache = prefill(state, tokens[:, :ctx], ctx)
    pos = jnp.broadcast_to(jnp.arange(n_lat) // (side // px) * cfg.latent.max_latent_size
                           + jnp.arange(n_lat) % (side // px), (b, n_lat))

    @jax.jit
    def sample(state, cache, noise):
        m = nnx.merge(graph, state)
        g = flow.Guidance.make(4.0, 2.0, (0.0, 1.0))
        return irg_loop.generate_latents(m, [cache, cache, cache], noise, pos, num_steps=args.num_steps, shift=3.0,
                                         guidance=g, renorm_type="text_channel")

    noise = jax.random.normal(jax.random.key(4), (b, n_lat, latent_token_dim(cfg)))
    t = timed(sample, state, cache, noise)
    rows.append((f"sampler {side}x{side} ({n_lat} tokens), 3 branches, ctx {ctx}",
                 f"{(args.num_steps - 1) / t:.2f} steps/s ({t / (args.num_steps - 1) * 1e3:.1f} ms/step)"))

    if not args.skip_loop:
        ae = build_autoencoder(cfg.autoencoder, nnx.Rngs(1))
        program = irg_loop.IRGProgram(model, ae)
        icfg = irg_loop.InferenceConfig(image_size=(side, side), num_steps=args.num_steps,
                                        max_think_tokens=args.think_tokens, max_prompt_tokens=32)
        bos, eos = cfg.special_ids.bos, cfg.special_ids.eos
        sys_ids = np.tile(np.asarray([[bos] + list(range(1, 31)) + [eos]], np.int32), (b, 1))
        p_ids = np.tile(np.asarray([[bos] + list(range(40, 60)) + [eos] + [0] * 12], np.int32), (b, 1))
        inputs = (icfg.static(), icfg.dynamic(), sys_ids, np.full(b, 32, np.int32), p_ids, np.full(b, 22, np.int32),
                  irg_loop.row_keys_for(0, list(range(b))))
        t0 = time.perf_counter()
        mem = program.lower(*inputs).compile().memory_analysis()
        turns = jax.block_until_ready(program(*inputs))
        compile_s = time.perf_counter() - t0
        if mem is not None:
            rows.append(("IRG loop compiled memory", f"temp {mem.temp_size_in_bytes / 2**30:.1f} GiB, "
                                                     f"args {mem.argument_size_in_bytes / 2**30:.1f} GiB"))
        t = timed(lambda: program(*inputs), repeats=2)
        lens = [int(np.asarray(tr.think.length).mean()) for tr in turns]
        rows.append((f"IRG loop: {side}px, {args.num_steps} steps, think <= {args.think_tokens} (got {lens})",
                     f"{b / t:.3f} prompts/s ({t:.2f} s per batch of {b}; first call incl. compile {compile_s:.1f} s)"))

    print("| quantity | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    print()
    print("\n".join(decode_table))
    small, large = min(caps), max(caps)
    for L in args.contexts:
        if (L, small) in table and (L, large) in table:
            print(f"\ncontext {L}: capacity {large} costs {table[L, large] / table[L, small]:.2f}x capacity {small}")


if __name__ == "__main__":
    main()
