"""Device mesh from the `mesh:` config section: axes (data, fsdp, tensor); -1 takes what is left."""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh

from mtr_jax.errors import MtrError

AXES = ("data", "fsdp", "tensor")


def mesh_shape(sizes: dict, n_devices: int) -> tuple[int, ...]:
    """Resolve {"data": -1, "fsdp": 2, "tensor": 1} against n_devices, or raise MtrError."""
    vals = []
    for a in AXES:
        v = sizes.get(a, 1)
        if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
            raise MtrError(f"mesh.{a}={v!r}: expected a positive integer or -1")
        vals.append(v)
    free = [i for i, v in enumerate(vals) if v == -1]
    if len(free) > 1:
        raise MtrError(f"mesh: at most one axis may be -1, got {dict(zip(AXES, vals))}")
    fixed = math.prod(v for v in vals if v != -1)
    if free:
        if n_devices % fixed:
            raise MtrError(f"mesh {dict(zip(AXES, vals))}: {n_devices} devices do not divide by {fixed}")
        vals[free[0]] = n_devices // fixed
    if math.prod(vals) != n_devices:
        raise MtrError(
            f"mesh {dict(zip(AXES, vals))} needs {math.prod(vals)} devices but {n_devices} are available"
        )
    return tuple(vals)


def make_mesh(mesh_cfg=None, devices=None) -> Mesh:
    """`mesh_cfg`: a MeshConfig, a dict, or None (all devices on `data`)."""
    devices = list(devices if devices is not None else jax.devices())
    if mesh_cfg is None:
        sizes = {"data": -1}
    elif isinstance(mesh_cfg, dict):
        sizes = dict(mesh_cfg)
    else:
        sizes = {a: getattr(mesh_cfg, a) for a in AXES}
    shape = mesh_shape(sizes, len(devices))
    # Auto axes: shardings are hints from in/out shardings; XLA propagates the rest
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
