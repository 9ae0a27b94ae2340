"""The Grain pipeline: exact resume (state and Orbax), global arrays on the 8-device mesh, metrics."""
import logging

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from _irg_rows import trajectory, write_parquet
from irg_jax.data import packed_batch as pb
from irg_jax.data.config import check_data_config, default_data_config
from irg_jax.data.mixture import MODES, stage1_groups, stage2_groups
from irg_jax.data.pipeline import make_train_iterator
from irg_jax.data.tokenizer import WordTokenizer

TOK = WordTokenizer.from_corpus(["draw a red circle think one two"] + [f"{i}" for i in range(64)])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("irg")
    for m, mode in enumerate(MODES):
        (root / mode).mkdir()
        rows = [trajectory(m * 100 + i, size=(32 + 16 * (i % 3), 32)) for i in range(12)]
        rows += [None, "{broken"]  # bad rows: skipped and counted
        write_parquet(root / mode / "part-00000.parquet", rows, row_group_size=5)
    return root


def tiny_config(root, stage=1):
    d = default_data_config()
    groups = stage1_groups if stage == 1 else stage2_groups
    d.groups = groups(str(root), vae=(16, 64, 32), vit=(14, 28, 28))
    d.expected_num_tokens, d.max_num_tokens = 200, 240
    d.max_num_tokens_per_sample, d.prefer_buffer_before, d.max_buffer_size = 200, 100, 4
    d.pack.und_len, d.pack.gen_len, d.pack.vit_len, d.pack.ce_len, d.pack.num_vae_images = 160, 96, 16, 48, 8
    d.pack.image_buckets = ((32, 48), (64, 64))
    d.max_latent_size, d.vit_max_patches_per_side = 4, 2
    d.vae_cond_dropout_prob = 0.3
    d.read_threads, d.prefetch_batches = 0, 0
    return d


def make(d, **kw):
    kw = {"seed": 7, "batch_size": 2, "process_index": 0, "process_count": 1, **kw}
    return make_train_iterator(d, None, TOK, **kw)


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


@pytest.fixture(autouse=True)
def quiet():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def test_batches_have_the_packed_layout(data_root):
    it, budgets = make(tiny_config(data_root))
    assert [b.vae_image_size for b in budgets] == [(32, 48), (64, 64)]
    for _ in range(3):
        batch = next(it)
        b = next(x for x in budgets if x.vae_image_size == batch["vae_images"].shape[2:4])
        for i in range(2):
            pb.check_pack({k: v[i] for k, v in batch.items()}, b)
    m = it.metrics()
    assert m["data/packs"] == 6 and m["data/samples"] > 6
    # every drawn sample is packed or waiting in a buffer; none is dropped
    assert m["data/packed"] == m["data/samples"] and m["data/dropped"] == 0
    assert m["data/drawn"] == m["data/packed"] + m["data/in_buffer"]
    assert sum(v for k, v in m.items() if k.startswith("data/drawn/")) == m["data/drawn"]
    assert sum(v for k, v in m.items() if k.startswith("data/packed/")) == m["data/packed"]
    assert m["data/skipped/null_conversation"] >= 1 or m["data/skipped/malformed_json"] >= 1
    assert 0 <= m["data/pad_fraction"] < 1


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_gives_the_identical_next_batch(data_root, prefetch):
    d = tiny_config(data_root)
    d.prefetch_batches = prefetch
    it, _ = make(d)
    for _ in range(4):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    fresh, _ = make(d)
    fresh.set_state(state)
    got = [next(fresh) for _ in range(2)]
    assert all(same(a, b) for a, b in zip(want, got))
    assert fresh.metrics()["data/packs"] == it.metrics()["data/packs"]
    other, _ = make(d, seed=8)
    assert not same(next(other), next(make(d)[0]))


def test_orbax_checkpoint_round_trip(data_root, tmp_path):
    import grain
    import orbax.checkpoint as ocp
    d = tiny_config(data_root)
    it, _ = make(d)
    for _ in range(3):
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = next(it)
    fresh, _ = make(d)
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert same(want, next(fresh))


def test_global_arrays_on_the_mesh(data_root):
    mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"))
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    d = tiny_config(data_root)
    it, _ = make(d, batch_size=8, sharding=sharding)
    batch = next(it)
    assert isinstance(batch["kind"], jax.Array) and batch["kind"].shape[0] == 8
    assert batch["vae_images"].sharding.is_equivalent_to(sharding, batch["vae_images"].ndim)
    assert len(batch["text_ids"].addressable_shards) == 8
    local, _ = make(d, batch_size=8)
    assert same({k: np.asarray(v) for k, v in batch.items()}, next(local))


def test_process_shards_are_disjoint(data_root):
    d = tiny_config(data_root, stage=2)
    d.vae_cond_dropout_prob = 0.0
    seen = []
    for p in range(2):
        it, _ = make(d, batch_size=2, process_index=p, process_count=2)
        batch = next(it)
        seen.append({tuple(batch["text_ids"][0][batch["kind"][0] == pb.TEXT][:40].tolist())})
    assert seen[0] != seen[1]


def test_startup_errors(data_root, tmp_path):
    d = tiny_config(data_root)
    d.groups.initial_full_learning.paths = (str(tmp_path / "missing"),)
    with pytest.raises(FileNotFoundError, match="missing"):
        make(d)
    d = tiny_config(data_root)
    d.pack.image_buckets = ((32, 48), (64, 32), (64, 64), (16, 16), (48, 48))
    with pytest.raises(ValueError, match="image_buckets"):
        check_data_config(d)
    for key, value in (("refine_bridge_start", 0.0), ("refine_bridge_start", 1.5), ("refine_bridge_shift", 0.0)):
        d = tiny_config(data_root)
        d[key] = value
        with pytest.raises(ValueError, match=f"config.data.{key}"):
            check_data_config(d)
    d = tiny_config(data_root)
    d.fail_fast = True
    it, _ = make(d)
    with pytest.raises(Exception, match="null_conversation|malformed_json"):
        for _ in range(20):
            next(it)


def test_worker_processes_resume_exactly(data_root):
    d = tiny_config(data_root)
    d.num_workers = 2
    it, _ = make(d)
    for _ in range(2):
        next(it)
    state = it.get_state()
    want = next(it)
    fresh, _ = make(d)
    fresh.set_state(state)
    assert same(want, next(fresh))
    it.close()
    fresh.close()
