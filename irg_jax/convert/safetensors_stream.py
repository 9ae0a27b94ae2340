"""Read and write ``.safetensors`` files one tensor at a time.

Reading uses ``safetensors.safe_open`` (memory-mapped; the header gives every shape and
dtype before any data is read). Writing is done here because ``safetensors.save_file``
needs every tensor in memory at once: :func:`write_streamed` lays out the header from
declared shapes and dtypes, then asks for each tensor in turn and writes its bytes.

File format (safetensors spec): an unsigned little-endian 64-bit header length N, N
bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}`` (offsets relative to the data section, padded with spaces to 8 bytes),
then the concatenated little-endian tensor bytes.
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Callable, Mapping, Sequence

import ml_dtypes
import numpy as np
from safetensors import safe_open

from irg_jax.convert.errors import ConvertError

_CODES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def dtype_code(dtype) -> str:
    """numpy dtype -> safetensors dtype string ('F32', 'BF16', ...)."""
    dtype = np.dtype(dtype)
    if dtype not in _CODES:
        raise ValueError(f"dtype {dtype} cannot be written to safetensors here (supported: "
                         f"{sorted(str(d) for d in _CODES)})")
    return _CODES[dtype]


class SafetensorsSource:
    """Shapes, dtypes and (on request) the data of one safetensors file.

    Use as a context manager; :meth:`read` returns one tensor as a numpy array (bfloat16
    via ml_dtypes), so only the tensor being converted is ever materialised.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such safetensors file")
        self._file = None

    def __enter__(self) -> "SafetensorsSource":
        try:
            self._file = safe_open(str(self.path), framework="numpy")
        except Exception as e:  # safetensors raises its own error type for a bad header
            raise ConvertError(f"{self.path}: not a readable safetensors file ({e})") from None
        self._keys = list(self._file.keys())
        self._info = {}
        for key in self._keys:
            s = self._file.get_slice(key)
            self._info[key] = (tuple(int(d) for d in s.get_shape()), s.get_dtype())
        return self

    def __exit__(self, *exc) -> None:
        self._file = None

    def keys(self) -> list[str]:
        return list(self._keys)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v[0] for k, v in self._info.items()}

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][0]

    def nbytes(self, key: str) -> int:
        shape, code = self._info[key]
        itemsize = _DTYPES[code].itemsize if code in _DTYPES else 4
        return int(np.prod(shape, dtype=np.int64)) * itemsize

    def read(self, key: str) -> np.ndarray:
        if self._file is None:
            raise RuntimeError(f"{self.path}: read() outside the `with` block")
        return self._file.get_tensor(key)

    def metadata(self) -> dict[str, str]:
        return dict(self._file.metadata() or {})


def _header(entries: Sequence[tuple[str, tuple[int, ...], np.dtype]], metadata: Mapping[str, str] | None):
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, shape, dtype in entries:
        if name in header:
            raise ValueError(f"tensor name {name!r} declared twice")
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": dtype_code(dtype), "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw


def write_streamed(path: str | os.PathLike, entries: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                   produce: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None,
                   on_written: Callable[[int], None] | None = None) -> pathlib.Path:
    """Write ``entries`` ((name, shape, dtype), in file order), calling ``produce(name)`` for each.

    Each produced array must have exactly the declared shape and dtype (ValueError naming
    the tensor otherwise) and is dropped after its bytes are written. The file appears at
    ``path`` only when complete (written to ``path.partial`` first). ``on_written(nbytes)``
    is called after each tensor (e.g. a progress bar's ``update``).
    """
    path = pathlib.Path(path)
    partial = path.with_name(path.name + ".partial")
    header = _header(entries, metadata)
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name, shape, dtype in entries:
            arr = np.asarray(produce(name))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"{path}: tensor {name} was declared {tuple(shape)} {np.dtype(dtype)} but "
                                 f"produced {arr.shape} {arr.dtype}")
            data = np.ascontiguousarray(arr)
            if data.dtype.byteorder == ">":
                data = data.byteswap()
            f.write(memoryview(data.reshape(-1).view(np.uint8)))
            if on_written is not None:
                on_written(data.nbytes)
            del arr, data
    os.replace(partial, path)
    return path

