#!/usr/bin/env python3
"""Launch an `mtr` command (sft, grpo, eval, ...) on every worker of the slice (`--worker=all`),
in the background, logging to ~/mtr-logs/<stage>.log on each worker. Follow with logs.py.

  tpu_scripts/launch.py --type v5litepod-8 --zone us-west4-a --name mtr \
      grpo --config configs/grpo-qwen2.5-0.5b-instruct.yaml run.out_dir=gs://BUCKET/grpo [--resume]
"""

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpulib  # noqa: E402

STAGES = ("sft", "grpo", "eval", "make-tools", "make-traces", "export-hf", "import-hf", "demo", "bench", "plan")


def add_arguments(p):
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for the run (repeatable)")
    p.add_argument("--log", default="", help="log file name under ~/mtr-logs (default: <stage>.log)")
    p.add_argument("stage", help=f"mtr subcommand: {', '.join(STAGES)}")
    p.add_argument("mtr_args", nargs=argparse.REMAINDER, help="its arguments (--config C key=value ...); launch.py options go before the stage")


def build(args):
    # REMAINDER swallows options written after the stage; --dry-run is always ours (mtr has none)
    if "--dry-run" in args.mtr_args:
        args.mtr_args = [a for a in args.mtr_args if a != "--dry-run"]
        args.dry_run = True
    tpulib.require(args, "accel", "zone", "name")
    acc = tpulib.Accel(args.accel)
    if args.stage not in STAGES:
        raise tpulib.UsageError(f"unknown stage {args.stage!r} (known: {', '.join(STAGES)})")
    for e in args.env:
        if "=" not in e or not e.split("=", 1)[0].isidentifier():
            raise tpulib.UsageError(f"--env {e!r}: expected KEY=VALUE")
    if acc.hosts > 1:
        outs = [a.split("=", 1)[1] for a in args.mtr_args if a.startswith("run.out_dir=")]
        if outs and not outs[0].startswith("gs://"):
            raise tpulib.UsageError(f"{acc.gcloud_type} has {acc.hosts} hosts: run.out_dir must be gs:// (every host writes its checkpoint shards there)")
    # MTR_DISTRIBUTED=1 makes every host call jax.distributed.initialize() (the slice is found from TPU metadata)
    env = ["MTR_DISTRIBUTED=1"] if acc.hosts > 1 else []
    env += args.env
    log = f"{tpulib.REMOTE_LOGS}/{args.log or args.stage + '.log'}"
    mtr = shlex.join(["mtr", args.stage, *args.mtr_args])
    command = (
        f"cd {tpulib.REMOTE_DIR} && mkdir -p {tpulib.REMOTE_LOGS} && "
        f"{' '.join(shlex.quote(e) for e in env)}{' ' if env else ''}"
        f"PATH={tpulib.REMOTE_VENV}/bin:$PATH setsid nohup {mtr} > {log} 2>&1 < /dev/null &"
    )
    return [tpulib.ssh(args, command)]


build.add_arguments = add_arguments

if __name__ == "__main__":
    tpulib.main(build, __doc__)
