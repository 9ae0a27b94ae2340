"""Input-pipeline throughput: packs, samples and tokens per second from ``make_train_iterator``.

    .venv/bin/python bench/data_pipeline.py                       # IRG toy data (fixture), IRG geometry
    .venv/bin/python bench/data_pipeline.py --data DIR --tokenizer PATH --images 64 \
        --und_len 2048 --gen_len 1024 --vit_len 256 --expected 2500 --batch 8

``--data`` is a folder holding the six mode folders (``<mode>/*.parquet``); ``--images``
switches to a small-image geometry (max/min size and a single bucket of that size).
The first ``--warmup`` batches are not timed (file opening, first decodes).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from irg_jax.data.config import default_data_config  # noqa: E402
from irg_jax.data.mixture import stage1_groups  # noqa: E402
from irg_jax.data.packed_batch import PAD  # noqa: E402
from irg_jax.data.pipeline import make_train_iterator  # noqa: E402
from irg_jax.data.tokenizer import load_tokenizer  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "irg_data")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(FIXTURE, "IRG-Toy_Dataset"))
    ap.add_argument("--tokenizer", default=os.path.join(FIXTURE, "tokenizer"))
    ap.add_argument("--images", type=int, default=0, help="small-image geometry: max/min size and bucket (0: IRG's)")
    ap.add_argument("--batch", type=int, default=2, help="packs per batch")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--num_workers", type=int, default=0)
    ap.add_argument("--read_threads", type=int, default=2)
    ap.add_argument("--und_len", type=int, default=12288)
    ap.add_argument("--gen_len", type=int, default=12288)
    ap.add_argument("--vit_len", type=int, default=8192)
    ap.add_argument("--expected", type=int, default=16000, help="expected_num_tokens (also max_num_tokens + 4000)")
    args = ap.parse_args(argv)

    from absl import flags
    flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
    logging.disable(logging.WARNING)

    d = default_data_config()
    if args.images:
        s = args.images
        d.groups = stage1_groups(args.data, vae=(16, s, s), vit=(14, s // 14 * 14, s // 14 * 14))
        d.pack.image_buckets = ((s, s),)
        d.max_latent_size = max(1, s // 16)
        d.vit_max_patches_per_side = max(1, s // 14)
    else:
        d.groups = stage1_groups(args.data)
        d.pack.image_buckets = ((768, 768), (1024, 1024))
    d.pack.und_len, d.pack.gen_len, d.pack.vit_len = args.und_len, args.gen_len, args.vit_len
    d.pack.ce_len, d.pack.num_vae_images = max(256, args.und_len // 4), 16
    d.expected_num_tokens = args.expected
    d.max_num_tokens = min(args.expected + 4000, args.und_len + args.gen_len)
    d.max_num_tokens_per_sample = min(d.max_num_tokens, 16384)
    d.prefer_buffer_before = args.expected // 2
    d.num_workers, d.read_threads = args.num_workers, args.read_threads

    it, budgets = make_train_iterator(d, None, load_tokenizer(args.tokenizer), seed=0, batch_size=args.batch,
                                      process_index=0, process_count=1)
    for _ in range(args.warmup):
        next(it)
    m0 = it.metrics()
    t0 = time.perf_counter()
    pad = 0
    for _ in range(args.batches):
        batch = next(it)
        pad += int((batch["kind"] == PAD).sum())
    dt = time.perf_counter() - t0
    m1 = it.metrics()
    packs = m1["data/packs"] - m0["data/packs"]
    samples = m1["data/samples"] - m0["data/samples"]
    tokens = m1["data/tokens"] - m0["data/tokens"]
    slots = args.batches * args.batch * budgets[0].seq_len
    print(f"data: {args.data}  workers={args.num_workers} read_threads={args.read_threads} "
          f"batch={args.batch} packs of {budgets[0].seq_len} tokens (und {budgets[0].und_len} + gen {budgets[0].gen_len})")
    print(f"{args.batches} batches in {dt:.2f}s: {args.batches / dt:.2f} batches/s, {packs / dt:.2f} packs/s, "
          f"{samples / dt:.1f} samples/s, {tokens / dt:,.0f} tokens/s (real), padding {pad / slots:.1%}")
    it.close()


if __name__ == "__main__":
    main()
