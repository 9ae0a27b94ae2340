"""Per-device bytes: of sharded abstract trees, and the largest values of a compiled program.

Shared by the training planner (``irg_jax.plan``) and the generation planner
(``irg_jax.inference.plan``)."""
from __future__ import annotations

import collections
import re
from typing import Any

import jax
import numpy as np


def shard_bytes(tree: Any) -> int:
    """Bytes per device of a tree of ShapeDtypeStructs (or arrays) with shardings; leaves without
    a sharding count nothing."""
    return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree) if getattr(x, "sharding", None) is not None))


_HLO_VALUE = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (\w+)\[([\d,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_HLO_BYTES = dict(pred=1, s8=1, u8=1, s16=2, u16=2, f16=2, bf16=2, s32=4, u32=4, f32=4, s64=8, u64=8, f64=8)


def largest_values(hlo_text: str, top: int = 8) -> list[dict]:
    """The ``top`` largest array shapes in an optimised HLO module, with how often each occurs.

    Where temporaries blow up, these name the culprit (shape and the JAX op that made it).
    They are values of the program, not a liveness analysis: not all are alive at once.
    """
    found: dict[tuple[str, str], dict] = {}
    counts: collections.Counter = collections.Counter()
    for line in hlo_text.splitlines():
        m = _HLO_VALUE.match(line)
        itemsize = _HLO_BYTES.get(m.group(1)) if m else None
        if itemsize is None:
            continue
        key = (m.group(1), m.group(2))
        counts[key] += 1
        op = _OP_NAME.search(line)
        if key not in found or (op and not found[key]["op"]):
            dims = [int(d) for d in m.group(2).split(",") if d]
            found[key] = dict(dtype=m.group(1), shape=dims, bytes=int(np.prod(dims)) * itemsize,
                              op=op.group(1) if op else "")
    out = sorted(found.values(), key=lambda v: -v["bytes"])[:top]
    for v in out:
        v["count"] = counts[(v["dtype"], ",".join(map(str, v["shape"])))]
    return out
