"""Share of (query, key) blocks the attention kernels compute on real IRG packs of the 7B config.

    .venv/bin/python bench/attention_blocks.py                      # stage 1, 8 packs, fixture data
    .venv/bin/python bench/attention_blocks.py --stage 2 --packs 4 --blocks 128 512

Packs come from ``make_train_iterator`` with the data config of ``configs/irgl_stage{1,2}.py``
(variant ``bagel_7b_mot``: 45,056-token packs, und 24,576 + gen 20,480, expert-sorted storage)
over ``tests/fixtures/irg_data``. For each pack and block size it reports, from the token
metadata (:mod:`irg_jax.model.kernels.block_lists`, the lists the kernels walk):

* computed: tiles with at least one allowed pair (visited by ``pallas_tpu`` / ``pallas_gpu``;
  ``chunked`` runs the same tiles through ``lax.cond``), over all tiles and over the tiles a
  block-causal kernel on storage order would visit;
* allowed pairs: (query, key) pairs the mask of spec §2.5 allows, over all pairs and over the
  L(L+1)/2 pairs of a causal mask.

Padding is its own causal document, so its tiles count as computed; ``--real`` reports the
figures restricted to the real tokens as well.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from irg_jax.config.irgl import irgl_config  # noqa: E402
from irg_jax.data.packed_batch import PAD_DOC  # noqa: E402
from irg_jax.data.pipeline import make_train_iterator  # noqa: E402
from irg_jax.model.attention import TokenMeta, mask_rule  # noqa: E402
from irg_jax.model.kernels import block_lists  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "irg_data")


@jax.jit
def allowed_pairs(meta: TokenMeta) -> jax.Array:
    """Number of allowed (query, key) pairs of one pack [1, L], one 128-query block at a time."""
    lq = meta.doc_id.shape[1]
    blk = 128
    padded = block_lists.pad_meta(meta, -(-lq // blk) * blk, query=True)
    rows = TokenMeta(*(a.reshape(-1, blk) for a in padded))
    keys = tuple(a[0][None, :] for a in meta)

    def one(qm):
        return mask_rule(*(a[:, None] for a in qm), *keys).sum(dtype=jnp.int32)  # <= 128 * L

    return jax.lax.map(one, rows).astype(jnp.float32).sum()


def pack_figures(meta: TokenMeta, block: int) -> dict:
    share = block_lists.block_share(meta, meta, block, block)
    n = meta.doc_id.shape[1]
    pairs = float(allowed_pairs(meta))
    return dict(tokens=n, **share, pairs=pairs, pair_total=float(n) * n, pair_causal=n * (n + 1) / 2)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, default=1, choices=(1, 2))
    ap.add_argument("--packs", type=int, default=8)
    ap.add_argument("--blocks", type=int, nargs="+", default=None,
                    help="block sizes (default: 128 and the config's model.attention.block_q)")
    ap.add_argument("--real", action="store_true", help="also report the figures without the padding tokens")
    args = ap.parse_args(argv)
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    logging.disable(logging.WARNING)

    data_root, tokenizer = os.path.join(FIXTURE, "IRG-Toy_Dataset"), os.path.join(FIXTURE, "tokenizer")
    cfg = irgl_config(args.stage, f"bagel_7b_mot,data_root={data_root},tokenizer={tokenizer}")
    cfg.data.num_workers = 0
    blocks = args.blocks or sorted({128, int(cfg.model.attention.block_q)})
    it, budgets = make_train_iterator(cfg.data, cfg.model, seed=0, batch_size=1, process_index=0, process_count=1)
    print(f"stage {args.stage}, 7B config packs of {budgets[0].seq_len} tokens (und {budgets[0].und_len} + gen "
          f"{budgets[0].gen_len}), model.attention.block_q/k = {cfg.model.attention.block_q}/"
          f"{cfg.model.attention.block_k}, fixture {data_root}")
    rows = {b: [] for b in blocks}
    rows_real = {b: [] for b in blocks}
    for p in range(args.packs):
        batch = next(it)
        meta = TokenMeta(*(jnp.asarray(np.asarray(batch[f])[:1], jnp.int32)
                           for f in ("doc_id", "split_id", "split_mode", "seq_pos")))
        docs = np.asarray(batch["doc_id"][0])
        real = int((docs != PAD_DOC).sum())
        line = [f"pack {p}: {real} real tokens, {len(set(docs[docs != PAD_DOC].tolist()))} samples"]
        for b in blocks:
            f = pack_figures(meta, b)
            rows[b].append(f)
            line.append(f"[{b}] {f['computed']}/{f['total']} tiles ({f['computed'] / f['total']:.1%}, "
                        f"{f['computed'] / f['causal']:.1%} of causal), pairs {f['pairs'] / f['pair_total']:.1%}")
            if args.real:
                order = np.argsort(docs == PAD_DOC, kind="stable")[:real]  # real tokens, storage order kept
                sub = TokenMeta(*(a[:, order] for a in meta))
                rows_real[b].append(pack_figures(sub, b))
        print("  ".join(line), flush=True)
    it.close()

    def summary(name, table):
        for b, fs in table.items():
            if not fs:
                continue
            tot = {k: sum(f[k] for f in fs) for k in fs[0]}
            print(f"{name} block {b}x{b}: {len(fs)} packs, {tot['tokens'] / len(fs):,.0f} tokens each; tiles computed "
                  f"{tot['computed']}/{tot['total']} = {tot['computed'] / tot['total']:.1%} of all, "
                  f"{tot['computed'] / tot['causal']:.1%} of block-causal ({tot['causal'] / tot['total']:.1%} of all); "
                  f"allowed pairs {tot['pairs'] / tot['pair_total']:.2%} of all, "
                  f"{tot['pairs'] / tot['pair_causal']:.2%} of causal")

    summary("all tokens", rows)
    if args.real:
        summary("real tokens", rows_real)


if __name__ == "__main__":
    main()
