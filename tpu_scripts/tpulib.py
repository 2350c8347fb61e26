"""Shared pieces of the Cloud TPU scripts: settings (flags or environment), accelerator types,
and running (or, with --dry-run, printing) gcloud commands. Standard library only: the scripts run
on a laptop that has only `gcloud`, not this project.

Settings, each a flag or an environment variable:
  --project   MTR_PROJECT (else gcloud's default project)
  --zone      MTR_ZONE
  --name      MTR_TPU_NAME          the TPU VM (node) name; queued resources use NAME-qr
  --type      MTR_TPU_TYPE          v4-8, v5litepod-8 (or v5e-8), v5p-8, v6e-8, ...
  --runtime   MTR_TPU_RUNTIME       default per generation (Cloud TPU "software versions")
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

# generation -> (gcloud accelerator-type prefix, default runtime version, valid slice sizes,
#                TensorCores per JAX device (v4/v5p names count cores, 2 per chip), chips per host)
GENERATIONS = {
    "v4": ("v4", "tpu-ubuntu2204-base", [2**k for k in range(3, 13)], 2, 4),
    "v5e": ("v5litepod", "v2-alpha-tpuv5-lite", [1, 4, 8, 16, 32, 64, 128, 256], 1, 4),
    "v5p": ("v5p", "v2-alpha-tpuv5", [2**k for k in range(3, 14)], 2, 4),
    "v6e": ("v6e", "v2-alpha-tpuv6e", [1, 4, 8, 16, 32, 64, 128, 256], 1, 4),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}

REMOTE_DIR = "$HOME/mtr_jax"  # where the project lives on every worker
REMOTE_VENV = "$HOME/mtr-venv"
REMOTE_LOGS = "$HOME/mtr-logs"


class UsageError(Exception):
    """Bad settings: printed as one line, exit code 2."""


class Accel:
    def __init__(self, name: str):
        m = re.fullmatch(r"([a-z0-9]+?)-(\d+)", str(name).strip().lower())
        gen = _ALIASES.get(m.group(1), m.group(1)) if m else None
        if not m or gen not in GENERATIONS:
            raise UsageError(
                f"unknown accelerator type {name!r}: expected one of v4-N, v5litepod-N (v5e-N), v5p-N, v6e-N "
                "(e.g. v4-8, v5litepod-8, v5p-8, v6e-8)"
            )
        prefix, runtime, sizes, cores, chips_per_host = GENERATIONS[gen]
        size = int(m.group(2))
        if size not in sizes:
            raise UsageError(f"accelerator type {name!r}: {gen} slices come in sizes {sizes}")
        self.generation, self.size = gen, size
        self.gcloud_type = f"{prefix}-{size}"
        self.runtime = runtime
        self.devices = size // cores  # JAX devices (chips) in the slice
        # single-host shapes: v4-8 / v5p-8 (4 chips), v5e / v6e up to 8 chips
        self.hosts = 1 if self.devices <= (8 if cores == 1 else 4) else self.devices // chips_per_host


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    env = os.environ.get
    p.add_argument("--project", default=env("MTR_PROJECT", ""), help="GCP project (env MTR_PROJECT; default: gcloud's)")
    p.add_argument("--zone", default=env("MTR_ZONE", ""), help="zone, e.g. us-central2-b (env MTR_ZONE)")
    p.add_argument("--name", default=env("MTR_TPU_NAME", ""), help="TPU VM name (env MTR_TPU_NAME)")
    p.add_argument("--type", dest="accel", default=env("MTR_TPU_TYPE", ""), help="accelerator type, e.g. v5litepod-8 (env MTR_TPU_TYPE)")
    p.add_argument("--dry-run", action="store_true", help="print the gcloud commands instead of running them")
    return p


def require(args, *names: str) -> None:
    missing = [n for n in names if not getattr(args, n, "")]
    if missing:
        flags = {"accel": "--type / MTR_TPU_TYPE", "zone": "--zone / MTR_ZONE", "name": "--name / MTR_TPU_NAME",
                 "project": "--project / MTR_PROJECT"}
        raise UsageError("missing setting(s): " + ", ".join(flags.get(n, "--" + n) for n in missing))


def common(args) -> list[str]:
    """--zone/--project flags every gcloud tpu command takes."""
    out = ["--zone", args.zone]
    if args.project:
        out += ["--project", args.project]
    return out


def ssh(args, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *common(args), f"--worker={worker}", "--command", command]


def scp(args, src: str, dst: str, worker: str = "all", recurse: bool = False) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", *(["--recurse"] if recurse else []), src, dst, *common(args),
            f"--worker={worker}"]


def run(cmds: list[list[str]], dry_run: bool) -> int:
    """Run each command in turn (stop at the first failure), or print them all for --dry-run."""
    for cmd in cmds:
        line = shlex.join(cmd)
        if dry_run:
            print(line)
            continue
        print(f"+ {line}", file=sys.stderr, flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"error: command failed with exit code {rc}: {line}", file=sys.stderr)
            return rc
    return 0


def main(build, description: str) -> None:
    """`build(args) -> list of commands`; UsageError -> one line on stderr, exit 2."""
    p = parser(description)
    add = getattr(build, "add_arguments", None)
    if add:
        add(p)
    args = p.parse_args()
    try:
        cmds = build(args)  # may set args.dry_run (launch.py)
    except UsageError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(cmds, args.dry_run))
