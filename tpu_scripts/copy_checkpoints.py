#!/usr/bin/env python3
"""Copy a run directory (checkpoints, metrics.jsonl, TensorBoard events) off the TPU VM.

  run dir on the VM (relative to ~/mtr_jax) -> local DEST:    scp from worker 0
  run dir on the VM -> gs://DEST:                             worker 0 runs gcloud storage cp
  run dir on gs:// -> local DEST:                             gcloud storage cp here

  tpu_scripts/copy_checkpoints.py --zone us-west4-a --name mtr --run-dir runs/grpo-qwen2.5-0.5b --dest ./runs/
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpulib  # noqa: E402


def add_arguments(p):
    p.add_argument("--run-dir", required=True, help="run.out_dir of the run (path on the VM, or gs://...)")
    p.add_argument("--dest", required=True, help="local directory or gs://...")


def build(args):
    src, dest = args.run_dir.rstrip("/"), args.dest
    if src.startswith("gs://"):
        if dest.startswith("gs://"):
            return [["gcloud", "storage", "cp", "-r", src, dest]]
        return [["mkdir", "-p", dest], ["gcloud", "storage", "cp", "-r", src, dest]]
    tpulib.require(args, "zone", "name")
    if src.startswith("/") or src.startswith("~"):
        remote = src
    else:
        remote = f"{tpulib.REMOTE_DIR}/{src}"
    if args.accel and tpulib.Accel(args.accel).hosts > 1:
        raise tpulib.UsageError("multi-host slices write checkpoint shards on every host: use a gs:// run.out_dir and copy from there")
    if dest.startswith("gs://"):
        return [tpulib.ssh(args, f"gcloud storage cp -r {remote} {dest}", worker="0")]
    # scp expands ~ on the remote side, not $HOME
    remote_scp = remote.replace("$HOME/", "~/")
    return [["mkdir", "-p", dest], tpulib.scp(args, f"{args.name}:{remote_scp}", dest, worker="0", recurse=True)]


build.add_arguments = add_arguments

if __name__ == "__main__":
    tpulib.main(build, __doc__)
