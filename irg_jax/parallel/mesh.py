"""Build the device mesh from config: axes ``data``, ``fsdp``, ``tensor``, all ``AxisType.Auto``."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Fill a single ``-1`` so the product equals ``num_devices``; raise ValueError naming the key."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axis {unknown}; allowed {list(MESH_AXES)}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    for a, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise ValueError(f"mesh.{a}: size must be positive or -1, got {s}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if fill:
        if num_devices % known:
            raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices")
        sizes[fill[0]] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"mesh: shape {dict(zip(MESH_AXES, sizes))} has {int(np.prod(sizes))} devices, "
            f"but {num_devices} are available")
    return tuple(sizes)


def build_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def parse_mesh(text: str, flag: str = "--mesh") -> dict[str, int]:
    """``"data=1,fsdp=8,tensor=1"`` -> ``{"data": 1, "fsdp": 8, "tensor": 1}`` (-1 fills the rest)."""
    out = {}
    for part in filter(None, text.split(",")):
        name, sep, size = part.partition("=")
        if not sep or name not in MESH_AXES:
            raise ValueError(f"{flag}: expected axis=size with axis in {list(MESH_AXES)}, got {part!r}")
        try:
            out[name] = int(size)
        except ValueError:
            raise ValueError(f"{flag}: size of {name!r} must be an integer, got {size!r}") from None
    return out


def simulate_host_devices(num_devices: int, environ=os.environ) -> None:
    """Make JAX start ``num_devices`` CPU devices; call before JAX initialises its backend."""
    flags = [f for f in environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={num_devices}"])
    environ["JAX_PLATFORMS"] = "cpu"
