"""Checkpoints split into several ``.safetensors`` files with an index json (the Hugging Face layout).

    model-00001-of-00003.safetensors ... model-00003-of-00003.safetensors
    model.safetensors.index.json     {"metadata": {"total_size": <tensor bytes>},
                                      "weight_map": {tensor name: shard file name}}

:class:`ShardedSource` reads such a folder with the interface of
:class:`~irg_jax.convert.safetensors_stream.SafetensorsSource` (shapes from the headers, one
tensor read at a time); :func:`write_sharded` writes one, streaming like
:func:`~irg_jax.convert.safetensors_stream.write_streamed`; :func:`open_weights` opens
either layout from its path.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Callable, Mapping, Sequence

import numpy as np
from absl import logging

from irg_jax.convert.errors import ConvertError
from irg_jax.convert.safetensors_stream import SafetensorsSource, write_streamed

INDEX_SUFFIX = ".safetensors.index.json"
SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")


def shard_name(stem: str, i: int, n: int) -> str:
    return f"{stem}-{i:05d}-of-{n:05d}.safetensors"


def index_name(stem: str) -> str:
    return f"{stem}{INDEX_SUFFIX}"


def read_index(path: pathlib.Path) -> tuple[dict[str, str], dict]:
    """(weight_map, metadata) of an index json; :class:`ConvertError` naming the file otherwise."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConvertError(f"{path}: no 'weight_map' object (tensor name -> shard file)")
    for key, name in weight_map.items():
        if not isinstance(name, str) or pathlib.PurePath(name).name != name or not name.endswith(".safetensors"):
            raise ConvertError(f"{path}: weight_map[{key!r}] = {name!r} is not a .safetensors file name in the "
                               f"index's folder")
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ConvertError(f"{path}: 'metadata' must be an object, got {metadata!r}")
    return dict(weight_map), metadata


class ShardedSource:
    """Shapes, dtypes and data of a checkpoint given by its index json (see the module docstring).

    Every shard named in the index must exist and hold exactly the tensors the index maps to
    it (:class:`ConvertError` naming the shard and the tensors otherwise).
    """

    def __init__(self, index_path: str | os.PathLike):
        self.path = pathlib.Path(index_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such index file")
        self._sources: dict[str, SafetensorsSource] = {}

    def __enter__(self) -> "ShardedSource":
        weight_map, self._metadata = read_index(self.path)
        by_shard: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            by_shard.setdefault(name, []).append(key)
        missing = [n for n in sorted(by_shard) if not (self.path.parent / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.path}: shard files named in the weight_map are missing: "
                                    f"{', '.join(missing)}")
        try:
            for name in sorted(by_shard):
                source = SafetensorsSource(self.path.parent / name).__enter__()
                self._sources[name] = source
                held, listed = set(source.keys()), set(by_shard[name])
                if held != listed:
                    extra, absent = sorted(held - listed), sorted(listed - held)
                    raise ConvertError(
                        f"{self.path}: shard {name} does not hold what the weight_map says: "
                        f"{len(absent)} listed tensors absent {absent[:5]}, {len(extra)} unlisted tensors {extra[:5]}")
        except BaseException:
            self.__exit__()
            raise
        self._where = {key: self._sources[name] for key, name in weight_map.items()}
        total = sum(self.nbytes(k) for k in self._where)
        stated = self._metadata.get("total_size")
        if stated is not None and stated != total:
            logging.warning("%s: metadata.total_size %s, the shards hold %d tensor bytes", self.path, stated, total)
        return self

    def __exit__(self, *exc) -> None:
        for source in self._sources.values():
            source.__exit__()
        self._sources = {}

    @property
    def shard_paths(self) -> list[pathlib.Path]:
        return [s.path for s in self._sources.values()]

    def keys(self) -> list[str]:
        return list(self._where)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: s.shape(k) for k, s in self._where.items()}

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def nbytes(self, key: str) -> int:
        return self._where[key].nbytes(key)

    def read(self, key: str) -> np.ndarray:
        return self._where[key].read(key)

    def metadata(self) -> dict:
        return dict(self._metadata)


def open_weights(path: str | os.PathLike) -> SafetensorsSource | ShardedSource:
    """A single ``.safetensors`` file or an index json (use the result as a context manager)."""
    path = pathlib.Path(path)
    return ShardedSource(path) if path.name.endswith(INDEX_SUFFIX) else SafetensorsSource(path)


def split_entries(entries: Sequence[tuple[str, tuple[int, ...], np.dtype]], max_bytes: int) -> list[list]:
    """Entries in order, cut into consecutive groups of at most ``max_bytes`` of tensor data
    (a tensor larger than that gets a group of its own)."""
    if max_bytes <= 0:
        raise ValueError(f"max shard size must be positive, got {max_bytes} bytes")
    groups: list[list] = [[]]
    size = 0
    for entry in entries:
        n = int(np.prod(entry[1], dtype=np.int64)) * np.dtype(entry[2]).itemsize
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += n
    return groups


def stale_weight_files(folder: pathlib.Path, stem: str) -> list[pathlib.Path]:
    """Files of an earlier sharded write of ``stem`` in ``folder`` (shards and index)."""
    out = [p for p in folder.glob(f"{stem}-*-of-*.safetensors")
           if (m := SHARD_NAME.match(p.name)) and m.group("stem") == stem]
    index = folder / index_name(stem)
    return sorted(out + ([index] if index.exists() else []))


def write_sharded(folder: str | os.PathLike, entries: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                  produce: Callable[[str], np.ndarray], max_bytes: int, *, stem: str = "model",
                  metadata: Mapping[str, str] | None = None,
                  on_written: Callable[[int], None] | None = None) -> pathlib.Path:
    """Write ``entries`` as ``STEM-0000i-of-0000n.safetensors`` shards of at most ``max_bytes``
    of tensor data each, then ``STEM.safetensors.index.json``; returns the index path.

    Shards of an earlier write with the same stem are removed first; the index is written
    last, so a folder with an index holds complete shards.
    """
    folder = pathlib.Path(folder)
    for old in stale_weight_files(folder, stem):
        old.unlink()
    groups = split_entries(entries, max_bytes)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        name = shard_name(stem, i, len(groups))
        write_streamed(folder / name, group, produce, metadata=metadata, on_written=on_written)
        for key, shape, dtype in group:
            weight_map[key] = name
            total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    index = folder / index_name(stem)
    partial = index.with_name(index.name + ".partial")
    partial.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    os.replace(partial, index)
    return index
