"""The training input pipeline on Grain: parquet rows -> samples -> packs -> global batches.

    per group (dataset mode):
      MapDataset.source(ParquetRows)      every row of the group's parquet files
        .shuffle(seed_g).repeat()         seeded global shuffle, reshuffled every epoch
        .map(RowDecoder)                  parse + tokenize + image transforms -> Sample | Skipped
    PackIterDataset(groups, rows)         IRG's packing policy (pack_policy.py), one stream per batch
                                          row: row r of B reads elements r::B of every group
      .mp_prefetch(num_workers)           optional worker processes (each builds a slice of the rows)
    BatchIterDataset                      local batch: this process's rows; one image bucket
      ThreadPrefetchIterDataset           optional background thread
    TrainIterator                         global jax.Arrays (make_array_from_process_local_data),
                                          skip/overflow metrics, exact checkpointable state

Multi-process: each process builds only the rows of the global batch that its devices hold
(a contiguous block, read from ``sharding``), so it reads and decodes only its share of the
data, and the global batch of a step is the same whatever the number of processes or workers.

Resume is exact: the state holds, per batch row, the number of packs emitted, each group's
cursor and the overflow buffer as ``(group, index)`` references (re-decoded on restore);
all packing randomness is drawn from a generator seeded by ``(seed, row, pack)``.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from irg_jax.data import packed_batch as pb
from irg_jax.data.config import (budgets_from_config, check_data_config, policy_from_config, rules_from_config,
                                 vae_stride)
from irg_jax.data.irg_format import ParquetRows, RowDecoder, SkipCounter
from irg_jax.data.mixture import groups_from_config
from irg_jax.data.pack_policy import GroupChoice, PackAssembler, PackingPolicy
from irg_jax.data.packing import NumpyPackRandom, PackingRules, rebucket, to_packed_batch
from irg_jax.data.tokenizer import Tokenizer, load_tokenizer
from irg_jax.data.transforms import bucket_for


def _seed32(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# ----------------------------------------------------------------------------- packs


class PackIterDataset(grain.IterDataset):
    """Packs for the batch rows ``rows``: pack ``k`` comes from the stream of row ``rows[k % len(rows)]``.

    Every row of the global batch has its own stream: row ``r`` of ``num_rows`` reads elements
    ``r::num_rows`` of every group dataset and draws its packing randomness from
    ``(seed, r, pack number)``. A step's global batch therefore does not depend on how its rows
    are spread over processes or worker processes.
    """

    def __init__(self, group_datasets: Sequence[grain.MapDataset], groups: Sequence[GroupChoice],
                 policy: PackingPolicy, rules: PackingRules, budgets: Sequence[pb.PackBudgets], *,
                 seed: int, rows: Sequence[int], num_rows: int, read_threads: int = 0, fail_fast: bool = False):
        super().__init__(list(group_datasets))
        self.group_datasets = list(group_datasets)
        self.groups, self.policy, self.rules, self.budgets = list(groups), policy, rules, tuple(budgets)
        self.seed, self.rows, self.num_rows = seed, list(rows), num_rows
        self.read_threads, self.fail_fast = read_threads, fail_fast
        self.worker_slice = slice(0, None, 1)

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Called by ``mp_prefetch`` in each worker: build only this worker's slice of the rows.

        Worker ``w`` of ``W`` takes rows ``w::W``; Grain interleaves the workers' packs one by
        one, which restores the row order when ``W`` divides the number of rows."""
        del sequential_slice
        self.worker_slice = sl

    def __iter__(self) -> "PackIterator":
        return PackIterator(self)

    def __str__(self) -> str:
        return f"PackIterDataset(groups={[g.name for g in self.groups]}, rows={self.rows})"


class _RowStream:
    """The packs of one batch row: its share of every group, its cursors, buffer and randomness."""

    def __init__(self, ds: PackIterDataset, row: int, counter: SkipCounter):
        self._ds, self.row = ds, row
        self._sources = [g[row::ds.num_rows] for g in ds.group_datasets]
        self._assembler = PackAssembler(ds.groups, ds.policy, ds.rules, ds.budgets[-1], counter)
        self._iters: list = [None] * len(self._sources)
        self._cursors = [0] * len(self._sources)
        self._num_packs = 0

    def _stream(self, g: int):
        if self._iters[g] is None:
            opts = grain.ReadOptions(num_threads=self._ds.read_threads, prefetch_buffer_size=max(2, 2 * self._ds.read_threads))
            it = self._sources[g].to_iter_dataset(opts).__iter__()
            if self._cursors[g]:
                grain.experimental.set_next_index(it, self._cursors[g])
            self._iters[g] = it
        return self._iters[g]

    def _draw(self, g: int):
        index = self._cursors[g]
        element = next(self._stream(g))
        self._cursors[g] += 1
        return index, element

    def next_pack(self):
        rng = np.random.default_rng([self._ds.seed, self.row, self._num_packs])
        result = self._assembler.next_pack(self._draw, NumpyPackRandom(rng))
        self._num_packs += 1
        return result

    def get_state(self) -> dict[str, Any]:
        return {"row": self.row, "num_packs": self._num_packs, "cursors": list(self._cursors),
                "buffer": self._assembler.buffer_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if int(state["row"]) != self.row:
            raise ValueError(f"data state of batch row {state['row']} restored into row {self.row}")
        self._num_packs = int(state["num_packs"])
        self._cursors = [int(c) for c in state["cursors"]]
        self.close()
        self._assembler.restore_buffer(state["buffer"], lambda g, i: self._sources[g][i])

    def close(self) -> None:
        for it in self._iters:
            if it is not None and hasattr(it, "close"):
                it.close()
        self._iters = [None] * len(self._sources)


class PackIterator(grain.DatasetIterator):
    def __init__(self, ds: PackIterDataset):
        super().__init__()
        self._ds = ds
        self._counter = SkipCounter(fail_fast=ds.fail_fast)
        self._streams = [_RowStream(ds, r, self._counter) for r in ds.rows[ds.worker_slice]]
        if not self._streams:
            raise ValueError(f"no batch rows for this worker: rows {ds.rows}, worker slice {ds.worker_slice}")
        self._next = 0  # the stream that builds the next pack

    def __next__(self) -> dict[str, Any]:
        before = copy.deepcopy((self._counter.skipped, self._counter.noted))
        result = self._streams[self._next].next_pack()
        self._next = (self._next + 1) % len(self._streams)
        usage = result.pack.usage()
        bucket = bucket_for([b.vae_image_size for b in self._ds.budgets], usage.max_h, usage.max_w)
        arrays = to_packed_batch(result.pack, self._ds.budgets[bucket])
        stats = collections.Counter(result.stats)
        stats["packs"] = 1
        stats["pad_tokens"] = self._ds.budgets[bucket].seq_len - result.pack.num_tokens
        for prefix, now, old in (("skipped", self._counter.skipped, before[0]), ("noted", self._counter.noted, before[1])):
            for k, v in (now - old).items():
                stats[f"{prefix}/{k}"] = v
        return {"arrays": arrays, "bucket": bucket, "stats": dict(stats), "sources": list(result.pack.sources)}

    def get_state(self) -> dict[str, Any]:
        return {"next": self._next, "streams": [s.get_state() for s in self._streams]}

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state["streams"]) != len(self._streams):
            raise ValueError(f"data state holds {len(state['streams'])} batch rows, this iterator builds "
                             f"{len(self._streams)}: resume with the same batch size and process count")
        for stream, s in zip(self._streams, state["streams"]):
            stream.set_state(s)
        self._next = int(state["next"])


# ----------------------------------------------------------------------------- batches


class BatchIterDataset(grain.IterDataset):
    """Stacks ``batch_size`` packs; all are padded into the smallest bucket holding every one."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, buckets: Sequence[tuple[int, int]], vae_stride: int):
        super().__init__(parent)
        self.batch_size, self.buckets, self.vae_stride = batch_size, list(buckets), vae_stride

    def __iter__(self):
        return _BatchIterator(self._parent.__iter__(), self)


class _BatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, ds: BatchIterDataset):
        super().__init__(parent)
        self._ds = ds

    def __next__(self) -> dict[str, Any]:
        packs = [next(self._parent) for _ in range(self._ds.batch_size)]
        hw = [self._ds.buckets[p["bucket"]] for p in packs]
        bucket = bucket_for(self._ds.buckets, max(h for h, _ in hw), max(w for _, w in hw))
        arrays = [rebucket(p["arrays"], self._ds.buckets[bucket], self._ds.vae_stride) for p in packs]
        stats: collections.Counter = collections.Counter()
        for p in packs:
            stats.update(p["stats"])  # counts add up; buffer_size too: each pack is another row's
        stats["max_wait"] = max(p["stats"].get("max_wait", 0) for p in packs)
        return {"arrays": {k: np.stack([a[k] for a in arrays]) for k in arrays[0]},
                "bucket": bucket, "stats": dict(stats), "sources": [p.get("sources", []) for p in packs]}

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


# ----------------------------------------------------------------------------- trainer-facing


_LAST_VALUE_STATS = ("buffer_size",)
_MAX_STATS = ("max_wait",)


class TrainIterator(grain.DatasetIterator):
    """Yields the global batch as a dict of ``jax.Array`` (``sharding`` on the batch axis) or, with
    ``sharding=None``, of local numpy arrays. :meth:`metrics` gives running counts."""

    def __init__(self, parent: grain.DatasetIterator, *, sharding=None, buckets: Sequence[tuple[int, int]],
                 vae_stride: int, process_count: int, startup_metrics: dict[str, int], global_batch: int,
                 rows: Sequence[int]):
        super().__init__(parent)
        self._sharding, self._buckets, self._vae_stride = sharding, list(buckets), vae_stride
        self._global_batch = global_batch
        self.rows = tuple(rows)  # the rows of the global batch this process builds
        self._process_count = process_count
        self._totals: collections.Counter = collections.Counter(startup_metrics)
        self._last: dict[str, float] = {}
        # The rows ("<file> row <n>") packed into each of this process's packs of the last batch.
        self.last_sources: list[list[str]] = []

    def __next__(self) -> dict[str, Any]:
        batch = next(self._parent)
        self.last_sources = batch.get("sources", [])
        bucket = batch["bucket"]
        if self._process_count > 1:  # every process must hand over the same shapes
            from jax.experimental import multihost_utils
            bucket = int(np.max(multihost_utils.process_allgather(np.asarray([bucket], np.int32))))
        arrays = rebucket(batch["arrays"], self._buckets[bucket], self._vae_stride)
        for k, v in batch["stats"].items():
            if k in _LAST_VALUE_STATS:
                self._last[k] = v
            elif k in _MAX_STATS:
                self._totals[k] = max(self._totals[k], v)
            else:
                self._totals[k] += v
        self._last["bucket"] = bucket
        n = arrays["kind"].size
        self._last["pad_fraction"] = float((arrays["kind"] == pb.PAD).sum()) / n
        if self._sharding is None:
            return arrays
        import jax
        return {k: jax.make_array_from_process_local_data(self._sharding, v, (self._global_batch,) + v.shape[1:])
                for k, v in arrays.items()}

    def metrics(self) -> dict[str, float]:
        """``data/<name>``, over this process's rows only:

        - cumulative counts: packs, samples (= packed), tokens, pad_tokens, drawn, packed,
          drawn/<group>, packed/<group>, from_buffer, buffered (samples sent to the buffer),
          mandatory_deferred (of those, mandatory ones), mandatory_postponed, skipped/<reason>,
          skipped_files/<reason>, noted/<reason>;
        - in_buffer: samples waiting in the overflow buffers after the last batch;
        - dropped: drawn - packed - in_buffer, drawn samples that were lost (always 0);
        - max_wait: most packs a sample spent in the buffer so far;
        - the last batch's bucket and pad_fraction.
        """
        out = {f"data/{k}": float(v) for k, v in sorted(self._totals.items())}
        out.update({f"data/{k}": float(v) for k, v in self._last.items() if k != "buffer_size"})
        in_buffer = self._last.get("buffer_size", 0)
        out["data/in_buffer"] = float(in_buffer)
        out["data/dropped"] = float(self._totals["drawn"] - self._totals["packed"] - in_buffer)
        return out

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "totals": dict(self._totals),
                "in_buffer": int(self._last.get("buffer_size", 0))}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self._totals = collections.Counter(state["totals"])
        self._last = {"buffer_size": int(state.get("in_buffer", 0))}


# ----------------------------------------------------------------------------- entry point


@dataclasses.dataclass(frozen=True)
class GroupSources:
    datasets: list
    choices: list
    startup_metrics: dict


def build_group_datasets(data, tokenizer: Tokenizer, *, seed: int,
                         max_bucket: tuple[int, int] | None) -> GroupSources:
    """Per used group: the shuffled, decoded, infinite ``MapDataset`` (every process sees the same
    order; the batch rows split it). Missing paths raise FileNotFoundError here, at start-up."""
    counter = SkipCounter(fail_fast=data.fail_fast)
    datasets, choices = [], []
    for i, g in enumerate(groups_from_config(data.groups)):
        rows = ParquetRows(g.paths, counter, cache_size=data.row_group_cache_size)
        if len(rows) == 0:
            why = "; ".join(f"{path}: {reason} ({detail})" for path, reason, detail in rows.problems)
            raise ValueError(f"config.data.groups.{g.name}: no readable rows in {list(g.paths)}"
                             + (f" ({why})" if why else ""))
        decoder = RowDecoder(tokenizer, g.vae.build(max_bucket), g.vit.build(), data.fail_fast, data.max_image_pixels)
        ds = grain.MapDataset.source(rows).shuffle(seed=_seed32(seed, i)).repeat(None).map(decoder)
        datasets.append(ds)
        choices.append(GroupChoice(g.name, g.is_mandatory, g.weight))
    return GroupSources(datasets, choices, counter.metrics())


def make_train_iterator(data, model=None, tokenizer: Tokenizer | None = None, *, seed: int,
                        batch_size: int, process_index: int | None = None, process_count: int | None = None,
                        sharding=None) -> tuple[TrainIterator, tuple[pb.PackBudgets, ...]]:
    """Build the training iterator.

    Args:
      data: ``config.data`` (see :func:`irg_jax.data.config.default_data_config`).
      model: the model config; only used for consistency checks (may be None).
      tokenizer: the text tokenizer; None loads ``data.tokenizer_path``.
      seed: data seed (shuffle, group choice, CFG dropout, timesteps). Same on every process.
      batch_size: *global* number of packs per step (rows of the global batch).
      process_index / process_count: without ``sharding``, this process builds the rows
        ``[i * B / n, (i + 1) * B / n)`` (default: ``jax.process_index()`` / ``jax.process_count()``).
      sharding: a ``jax.sharding.Sharding`` for the leading (batch) axis of every field, e.g.
        ``NamedSharding(mesh, P(("data", "fsdp")))``. With it each batch is a dict of global
        ``jax.Array`` built by ``jax.make_array_from_process_local_data``, and this process builds
        the rows its devices hold (which must be one contiguous block); without it, a dict of
        local numpy arrays (this process's rows).

    Returns:
      ``(iterator, budgets)``. ``next(iterator)`` is one batch with the fields of
      ``packed_batch.array_specs(budgets[k])`` and a leading batch axis, where ``k`` is the
      image bucket of that batch (``budgets`` is sorted by bucket area; a step function
      compiles once per bucket it sees). ``iterator.metrics()`` returns the skip/overflow
      counters; ``iterator.get_state()`` / ``set_state()`` (or Orbax with
      ``grain.checkpoint.CheckpointSave(iterator)`` / ``CheckpointRestore(iterator)``) resume
      exactly: the restored iterator yields the same next batch.
    """
    check_data_config(data, model)
    if process_index is None or process_count is None:
        import jax
        process_index, process_count = jax.process_index(), jax.process_count()
    if sharding is not None:
        rows = process_rows(sharding, batch_size)
    else:
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} does not divide over {process_count} processes")
        per = batch_size // process_count
        rows = list(range(process_index * per, (process_index + 1) * per))
    if data.num_workers > 1 and len(rows) % data.num_workers:
        raise ValueError(f"config.data.num_workers={data.num_workers} must divide the {len(rows)} batch rows "
                         "this process builds per step")
    if tokenizer is None:
        if not data.tokenizer_path:
            raise ValueError("config.data.tokenizer_path is empty and no tokenizer was given")
        tokenizer = load_tokenizer(data.tokenizer_path)
    budgets = budgets_from_config(data)
    buckets = [b.vae_image_size for b in budgets]
    sources = build_group_datasets(data, tokenizer, seed=seed, max_bucket=buckets[-1])
    ds: grain.IterDataset = PackIterDataset(
        sources.datasets, sources.choices, policy_from_config(data), rules_from_config(data, tokenizer), budgets,
        seed=seed, rows=rows, num_rows=batch_size, read_threads=data.read_threads, fail_fast=data.fail_fast)
    if data.num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers,
                                                          per_worker_buffer_size=data.worker_buffer_size))
    ds = BatchIterDataset(ds, len(rows), buckets, vae_stride(data))
    if data.prefetch_batches > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=data.prefetch_batches)
    iterator = TrainIterator(ds.__iter__(), sharding=sharding, buckets=buckets, vae_stride=vae_stride(data),
                             process_count=process_count, startup_metrics=sources.startup_metrics,
                             global_batch=batch_size, rows=rows)
    return iterator, budgets


def process_rows(sharding, batch_size: int) -> list[int]:
    """The rows of a ``[batch_size, ...]`` array with ``sharding`` on its leading axis that this
    process's devices hold: one contiguous block, as ``make_array_from_process_local_data`` wants."""
    held: set[int] = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        held.update(range(batch_size)[index[0]])
    rows = sorted(held)
    if not rows or rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError(f"this process's devices hold batch rows {rows} of {batch_size}: not one contiguous "
                         "block; order the mesh so that each process's devices are neighbours on the batch axes")
    return rows
