#!/usr/bin/env python3
"""Follow a run's log on one worker (worker 0 by default: it writes metrics and progress).

  tpu_scripts/logs.py --zone us-west4-a --name mtr grpo [--worker 0] [--lines 100] [--no-follow]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpulib  # noqa: E402


def add_arguments(p):
    p.add_argument("stage", help="the stage whose log to show (file ~/mtr-logs/<stage>.log)")
    p.add_argument("--worker", default="0", help="worker index, or 'all'")
    p.add_argument("--lines", type=int, default=100)
    p.add_argument("--no-follow", action="store_true")


def build(args):
    tpulib.require(args, "zone", "name")
    if not (args.worker == "all" or args.worker.isdigit()):
        raise tpulib.UsageError(f"--worker {args.worker!r}: expected an index or 'all'")
    follow = "" if args.no_follow else " -F"
    log = f"{tpulib.REMOTE_LOGS}/{args.stage}.log"
    return [tpulib.ssh(args, f"tail -n {args.lines}{follow} {log}", worker=args.worker)]


build.add_arguments = add_arguments

if __name__ == "__main__":
    tpulib.main(build, __doc__)
