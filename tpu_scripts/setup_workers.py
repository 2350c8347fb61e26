#!/usr/bin/env python3
"""Set up every worker of a TPU VM / pod slice: copy this project, install it with the `tpu` extra
into a venv, then check `jax.devices()` on all hosts (every host must see the whole slice).

  tpu_scripts/setup_workers.py --type v5litepod-8 --zone us-west4-a --name mtr [--source DIR] [--dry-run]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpulib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARBALL = "/tmp/mtr_jax-src.tar.gz"


def add_arguments(p):
    p.add_argument("--source", default=REPO, help="project directory to copy (default: this checkout)")
    p.add_argument("--skip-install", action="store_true", help="only run the device check")


def check_command(acc) -> str:
    # multi-host: all hosts run this at once; jax.distributed finds the slice from the TPU metadata
    init = "jax.distributed.initialize(); " if acc.hosts > 1 else ""
    # no quotes inside: the command passes through two shells
    code = (
        f"import jax; {init}n = jax.device_count(); "
        "print(dict(host=jax.process_index(), hosts=jax.process_count(), local=jax.local_device_count(), devices=n, "
        "kind=jax.devices()[0].device_kind)); "
        f"assert n == {acc.devices}, dict(expected={acc.devices}, got=n)"
    )
    return f'{tpulib.REMOTE_VENV}/bin/python -c "{code}"'


def build(args):
    tpulib.require(args, "accel", "zone", "name")
    acc = tpulib.Accel(args.accel)
    cmds = []
    if not args.skip_install:
        if not os.path.isfile(os.path.join(args.source, "pyproject.toml")):
            raise tpulib.UsageError(f"--source {args.source}: no pyproject.toml (not an mtr_jax checkout)")
        cmds.append(["tar", "czf", TARBALL, "--exclude=.git", "--exclude=runs", "--exclude=*.egg-info",
                     "--exclude=__pycache__", "-C", args.source, "."])
        cmds.append(tpulib.scp(args, TARBALL, f"{args.name}:mtr_jax-src.tar.gz"))
        install = (
            f"set -e; mkdir -p {tpulib.REMOTE_DIR} {tpulib.REMOTE_LOGS}; "
            f"tar xzf $HOME/mtr_jax-src.tar.gz -C {tpulib.REMOTE_DIR}; "
            f"python3 -m venv {tpulib.REMOTE_VENV}; "
            f"{tpulib.REMOTE_VENV}/bin/pip install -q -U pip; "
            f'{tpulib.REMOTE_VENV}/bin/pip install -q -e "{tpulib.REMOTE_DIR}[tpu]"'
        )
        cmds.append(tpulib.ssh(args, install))
    cmds.append(tpulib.ssh(args, check_command(acc)))
    return cmds


build.add_arguments = add_arguments

if __name__ == "__main__":
    tpulib.main(build, __doc__)
