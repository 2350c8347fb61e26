#!/usr/bin/env python3
"""Create a Cloud TPU VM (single host or pod slice), on-demand or spot, directly or as a queued
resource (waits until it is ACTIVE).

  tpu_scripts/create.py --type v5litepod-8 --zone us-west4-a --name mtr [--spot] [--queued] [--dry-run]
"""

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpulib  # noqa: E402


def add_arguments(p):
    p.add_argument("--runtime", default=os.environ.get("MTR_TPU_RUNTIME", ""), help="TPU software version (default per generation)")
    p.add_argument("--spot", action="store_true", default=os.environ.get("MTR_SPOT", "") == "1", help="spot capacity (env MTR_SPOT=1)")
    p.add_argument("--queued", action="store_true", default=os.environ.get("MTR_QUEUED", "") == "1",
                   help="create through a queued resource (env MTR_QUEUED=1); recommended for large slices")
    p.add_argument("--timeout-min", type=int, default=120, help="how long to wait for a queued resource")


def build(args):
    tpulib.require(args, "accel", "zone", "name")
    acc = tpulib.Accel(args.accel)
    runtime = args.runtime or acc.runtime
    spot = ["--spot"] if args.spot else []
    if args.queued:
        return [["gcloud", "compute", "tpus", "queued-resources", "create", f"{args.name}-qr", "--node-id", args.name,
                 *tpulib.common(args), "--accelerator-type", acc.gcloud_type, "--runtime-version", runtime, *spot]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *tpulib.common(args),
             "--accelerator-type", acc.gcloud_type, "--version", runtime, *spot]]


def describe(args):
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", f"{args.name}-qr", *tpulib.common(args),
            "--format=value(state.state)"]


def main():
    p = tpulib.parser(__doc__)
    add_arguments(p)
    args = p.parse_args()
    try:
        cmds = build(args)
    except tpulib.UsageError as e:
        print(f"create.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    rc = tpulib.run(cmds, args.dry_run)
    if rc or not args.queued:
        sys.exit(rc)
    if args.dry_run:
        print(tpulib.shlex.join(describe(args)) + "  # repeated until ACTIVE")
        return
    deadline = time.time() + 60 * args.timeout_min
    while time.time() < deadline:
        state = subprocess.run(describe(args), capture_output=True, text=True).stdout.strip()
        print(f"queued resource {args.name}-qr: {state or '?'}", file=sys.stderr, flush=True)
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            sys.exit(f"queued resource {args.name}-qr is {state}; see: {tpulib.shlex.join(describe(args)[:-1])}")
        time.sleep(30)
    sys.exit(f"queued resource {args.name}-qr not ACTIVE after {args.timeout_min} min")


if __name__ == "__main__":
    main()
