"""Multi-host start-up: `jax.distributed.initialize()` when the environment says we are one of
several processes (TPU pod slice, SLURM/Open MPI, or an explicit coordinator address)."""

from __future__ import annotations

import os

import jax

_done = False


def _multi_host_env() -> bool:
    env = os.environ
    if env.get("MTR_DISTRIBUTED") == "1":  # set on every worker by tpu_scripts/launch.py
        return True
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS"):
        return True
    # TPU VMs list every worker of the slice; one entry = single host
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return False


def spans_machines() -> bool:
    """True when the environment says this run's processes are on more than one machine (a pod
    slice's worker list, SLURM nodes, or a coordinator that is not this machine's loopback); then
    a local output directory would be split across their disks."""
    env = os.environ
    hosts = {h.strip() for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()}
    if len(hosts) > 1 or int(env.get("SLURM_JOB_NUM_NODES", "1") or 1) > 1:
        return True
    addr = env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS") or ""
    host = addr.rsplit(":", 1)[0].strip("[]")
    return bool(host) and host not in ("127.0.0.1", "localhost", "::1")


def maybe_initialize_distributed(force: bool = False) -> bool:
    """Initialise once when multi-host; returns True when jax.distributed is (now) initialised.

    Must run before anything touches a device. JAX auto-detects TPU/SLURM/MPI cluster settings;
    an explicit JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES / JAX_PROCESS_ID also works.
    """
    global _done
    if _done:
        return True
    if not (force or _multi_host_env()):
        return False
    kw = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kw["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
        if os.environ.get("JAX_NUM_PROCESSES"):
            kw["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if os.environ.get("JAX_PROCESS_ID"):
            kw["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kw)
    _done = True
    return True


def is_main_process() -> bool:
    return jax.process_index() == 0
