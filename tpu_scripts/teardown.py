#!/usr/bin/env python3
"""Delete the TPU VM (or its queued resource, with --queued). Billing stops when this returns.

  tpu_scripts/teardown.py --zone us-west4-a --name mtr [--queued] [--dry-run]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpulib  # noqa: E402


def add_arguments(p):
    p.add_argument("--queued", action="store_true", default=os.environ.get("MTR_QUEUED", "") == "1",
                   help="delete the queued resource NAME-qr and its node (env MTR_QUEUED=1)")


def build(args):
    tpulib.require(args, "zone", "name")
    if args.queued:
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", f"{args.name}-qr", *tpulib.common(args),
                 "--force", "--quiet"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *tpulib.common(args), "--quiet"]]


build.add_arguments = add_arguments

if __name__ == "__main__":
    tpulib.main(build, __doc__)
