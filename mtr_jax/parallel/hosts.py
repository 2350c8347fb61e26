"""Several processes, one program: host-local rows <-> global arrays, and the small agreements
(shapes, loop exits) every process must make the same way.

On a pod slice each process feeds and reads only ITS rows (its questions, its episodes, its tool
calls), but every jitted call is one SPMD program over the global mesh: all processes must call it
the same number of times with the same shapes. So any host-side decision that picks a shape or ends
a loop (a bucket, "is any row still running?") is agreed through a tiny all-gather first. With one
process every function here is the identity or a plain local computation, so single-host code
pays nothing.

Row layout: the global batch is the processes' local rows concatenated in process order
(`multihost_utils.host_local_array_to_global_array` over the batch axes), as grain's
shard_index/shard_count hands them out.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.sharding import PartitionSpec as P


def count() -> int:
    return jax.process_count()


def index() -> int:
    return jax.process_index()


def multi() -> bool:
    return jax.process_count() > 1


def gather(x: np.ndarray) -> np.ndarray:
    """[process_count, *x.shape]: every process's x (same shape and dtype on all)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def agree_max(*vals: int) -> tuple[int, ...]:
    """Each value's maximum over the processes (a bucket, a length): one all-gather for all."""
    if not multi():
        return tuple(int(v) for v in vals)
    return tuple(int(v) for v in gather(np.asarray(vals, np.int64)).max(axis=0))


def agree_min(*vals: int) -> tuple[int, ...]:
    if not multi():
        return tuple(int(v) for v in vals)
    return tuple(int(v) for v in gather(np.asarray(vals, np.int64)).min(axis=0))


def any_(flag: bool) -> bool:
    """True when the flag is true on any process (e.g. "a row is still running")."""
    return bool(flag) if not multi() else bool(gather(np.asarray([bool(flag)], np.int32)).max())


def all_(flag: bool) -> bool:
    return bool(flag) if not multi() else bool(gather(np.asarray([bool(flag)], np.int32)).min())


def total(x: float) -> float:
    """The sum of a host-local number over the processes."""
    return float(x) if not multi() else float(gather(np.asarray([float(x)], np.float64)).sum())


def gather_rows(x: np.ndarray) -> np.ndarray:
    """Host-local rows [n_i, ...] -> every process's rows concatenated in process order (n_i may
    differ between processes)."""
    x = np.asarray(x)
    if not multi():
        return x
    (n_max,) = agree_max(x.shape[0])
    pad = np.zeros((n_max,) + x.shape[1:], x.dtype)
    pad[: x.shape[0]] = x
    sizes = gather(np.asarray([x.shape[0]], np.int64))[:, 0]
    allx = gather(pad)
    return np.concatenate([allx[i, : sizes[i]] for i in range(len(sizes))], axis=0)


def gather_objects(objs: list) -> list:
    """Host-local JSON-able objects -> everyone's, concatenated in process order (eval rows)."""
    if not multi():
        return list(objs)
    blob = np.frombuffer(json.dumps(objs, ensure_ascii=False).encode(), np.uint8)
    size = np.asarray([blob.size], np.int64)
    sizes = gather(size)[:, 0]
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: blob.size] = blob
    allb = gather(buf)
    out: list = []
    for i, n in enumerate(sizes):
        out.extend(json.loads(allb[i, :n].tobytes().decode()))
    return out


def rows_spec(mesh, batch_axes, ndim: int) -> P:
    return P(tuple(batch_axes) or None, *([None] * (ndim - 1)))


def to_global(x: np.ndarray, mesh, batch_axes):
    """Host-local rows -> a global array, rows over `batch_axes` (each process passes its own)."""
    from jax.experimental import multihost_utils

    x = np.asarray(x)
    return multihost_utils.host_local_array_to_global_array(x, mesh, rows_spec(mesh, batch_axes, x.ndim))


def to_local(arr, mesh, batch_axes) -> np.ndarray:
    """A global array with rows over `batch_axes` -> this process's rows, on the host."""
    from jax.experimental import multihost_utils

    if not multi():
        return np.asarray(jax.device_get(arr))
    loc = multihost_utils.global_array_to_host_local_array(arr, mesh, rows_spec(mesh, batch_axes, arr.ndim))
    return np.asarray(loc)


def replicated(x, mesh):
    """The same host value on every process -> a replicated global array (a shared prefix)."""
    from jax.sharding import NamedSharding

    x = np.asarray(x)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P()), x)


def local_share(n: int) -> tuple[int, int]:
    """[start, stop) of this process's contiguous share of n global items (eval batches)."""
    k = -(-n // count())
    i = index()
    return min(i * k, n), min((i + 1) * k, n)
