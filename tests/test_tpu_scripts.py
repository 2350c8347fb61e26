"""tpu_scripts/: every script in --dry-run prints the exact gcloud commands; without --dry-run it
runs those same commands (a fake `gcloud` on PATH records them: nothing reaches Google Cloud); the
remote commands are real shell that works (run here under a fake $HOME); bad settings exit 2."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
import time

import pytest

from util import REPO

SCRIPTS = os.path.join(REPO, "tpu_scripts")
VENV = os.path.dirname(os.path.dirname(sys.executable))
BASE = ["--zone", "us-west4-a", "--name", "mtr-test"]
WHERE = ["--zone", "us-west4-a", "--project", "proj-x"]


@pytest.fixture()
def env(tmp_path):
    """PATH with a fake gcloud that logs its argv (one shlex line per call) and exits 0."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "gcloud.log"
    fake = bindir / "gcloud"
    fake.write_text(f"#!{sys.executable}\nimport shlex, sys\nopen({str(log)!r}, 'a').write(shlex.join(['gcloud'] + sys.argv[1:]) + '\\n')\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    e = dict(os.environ)
    e["PATH"] = f"{bindir}:{e['PATH']}"
    e["MTR_PROJECT"] = "proj-x"
    for k in ("MTR_ZONE", "MTR_TPU_NAME", "MTR_TPU_TYPE", "MTR_SPOT", "MTR_QUEUED", "MTR_TPU_RUNTIME"):
        e.pop(k, None)
    e["_GCLOUD_LOG"] = str(log)
    return e


def script(env, name, *args, check=True):
    p = subprocess.run([sys.executable, os.path.join(SCRIPTS, name), *args], env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def dry(env, name, *args) -> list[list[str]]:
    p = script(env, name, *args, "--dry-run")
    assert not os.path.exists(env["_GCLOUD_LOG"]), "dry run called gcloud"
    return [shlex.split(line.split("  #")[0]) for line in p.stdout.splitlines() if line.strip()]


def ssh(worker, command):
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mtr-test", *WHERE, f"--worker={worker}", "--command", command]


def test_create_on_demand_spot_and_queued(env):
    assert dry(env, "create.py", *BASE, "--type", "v5e-8") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "mtr-test", *WHERE, "--accelerator-type", "v5litepod-8",
         "--version", "v2-alpha-tpuv5-lite"]]
    assert dry(env, "create.py", *BASE, "--type", "v6e-8", "--spot")[0][-5:] == [
        "--accelerator-type", "v6e-8", "--version", "v2-alpha-tpuv6e", "--spot"]
    assert dry(env, "create.py", *BASE, "--type", "v5p-8")[0][-4:] == ["--accelerator-type", "v5p-8", "--version", "v2-alpha-tpuv5"]
    env2 = dict(env, MTR_QUEUED="1", MTR_TPU_TYPE="v4-32", MTR_ZONE="us-central2-b", MTR_TPU_NAME="pod")
    cmds = dry(env2, "create.py", "--spot")
    assert cmds == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "pod-qr", "--node-id", "pod", "--zone", "us-central2-b",
         "--project", "proj-x", "--accelerator-type", "v4-32", "--runtime-version", "tpu-ubuntu2204-base", "--spot"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "pod-qr", "--zone", "us-central2-b", "--project", "proj-x",
         "--format=value(state.state)"],
    ]


def test_setup_workers_copies_installs_and_checks_devices(env):
    cmds = dry(env, "setup_workers.py", *BASE, "--type", "v4-16")
    assert cmds[0][:3] == ["tar", "czf", "/tmp/mtr_jax-src.tar.gz"] and cmds[0][-3:] == ["-C", REPO, "."]
    assert cmds[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/mtr_jax-src.tar.gz", "mtr-test:mtr_jax-src.tar.gz",
                       *WHERE, "--worker=all"]
    assert cmds[2][:-1] == ssh("all", "")[:-1] and 'pip install -q -e "$HOME/mtr_jax[tpu]"' in cmds[2][-1]
    assert cmds[3][:-1] == ssh("all", "")[:-1]
    check = cmds[3][-1]
    assert "jax.distributed.initialize()" in check and "assert n == 8" in check  # v4-16: 2 hosts, 8 chips


def test_device_check_command_runs(env, tmp_path):
    """The remote check, run by bash here under a fake $HOME whose venv is ours (1 CPU device)."""
    check = dry(env, "setup_workers.py", *BASE, "--type", "v5litepod-1", "--skip-install")[0][-1]
    home = tmp_path / "home"
    home.mkdir()
    os.symlink(VENV, home / "mtr-venv")
    p = subprocess.run(["bash", "-c", check], env=dict(env, HOME=str(home), JAX_PLATFORMS="cpu"), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "'devices': 1" in p.stdout
    bad = dry(env, "setup_workers.py", *BASE, "--type", "v5litepod-4", "--skip-install")[0][-1]
    p = subprocess.run(["bash", "-c", bad], env=dict(env, HOME=str(home), JAX_PLATFORMS="cpu"), capture_output=True, text=True)
    assert p.returncode != 0 and "'expected': 4" in p.stderr  # a missing chip fails the check


def test_launch_runs_on_all_workers_in_background(env, tmp_path):
    cmds = dry(env, "launch.py", *BASE, "--type", "v5litepod-8", "--env", "HF_HOME=/mnt/hf",
               "grpo", "--config", "configs/grpo-qwen2.5-0.5b-instruct.yaml", "run.out_dir=gs://b/r", "--resume")
    assert cmds == [ssh("all", "cd $HOME/mtr_jax && mkdir -p $HOME/mtr-logs && HF_HOME=/mnt/hf PATH=$HOME/mtr-venv/bin:$PATH "
                        "setsid nohup mtr grpo --config configs/grpo-qwen2.5-0.5b-instruct.yaml run.out_dir=gs://b/r --resume "
                        "> $HOME/mtr-logs/grpo.log 2>&1 < /dev/null &")]
    multi = dry(env, "launch.py", *BASE, "--type", "v5p-16", "sft", "--config", "c.yaml", "run.out_dir=gs://b/s")
    assert "MTR_DISTRIBUTED=1 " in multi[0][-1]
    # the remote command really starts the run detached and logs it (here: `mtr plan` under a fake $HOME)
    home = tmp_path / "home"
    home.mkdir()
    os.symlink(VENV, home / "mtr-venv")
    os.symlink(REPO, home / "mtr_jax")
    cmd = dry(env, "launch.py", *BASE, "--type", "v5litepod-8", "plan", "--config", "configs/sft-qwen2.5-0.5b.yaml",
              "--stage", "sft")[0][-1]
    subprocess.run(["bash", "-c", cmd], env=dict(env, HOME=str(home), JAX_PLATFORMS="cpu"), check=True, timeout=30)
    log = home / "mtr-logs" / "plan.log"
    for _ in range(120):
        if log.exists() and "SFT: " in log.read_text():
            break
        time.sleep(0.5)
    assert "SFT: FITS" in log.read_text()


def test_logs_copy_teardown(env):
    assert dry(env, "logs.py", *BASE, "grpo") == [ssh("0", "tail -n 100 -F $HOME/mtr-logs/grpo.log")]
    assert dry(env, "logs.py", *BASE, "sft", "--worker", "all", "--no-follow", "--lines", "5") == [
        ssh("all", "tail -n 5 $HOME/mtr-logs/sft.log")]
    assert dry(env, "copy_checkpoints.py", *BASE, "--run-dir", "runs/grpo-x", "--dest", "out") == [
        ["mkdir", "-p", "out"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "mtr-test:~/mtr_jax/runs/grpo-x", "out", *WHERE, "--worker=0"]]
    assert dry(env, "copy_checkpoints.py", *BASE, "--run-dir", "runs/grpo-x", "--dest", "gs://b/x") == [
        ssh("0", "gcloud storage cp -r $HOME/mtr_jax/runs/grpo-x gs://b/x")]
    assert dry(env, "copy_checkpoints.py", "--run-dir", "gs://b/r/", "--dest", "out") == [
        ["mkdir", "-p", "out"], ["gcloud", "storage", "cp", "-r", "gs://b/r", "out"]]
    assert dry(env, "teardown.py", *BASE) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "mtr-test", *WHERE, "--quiet"]]
    assert dry(env, "teardown.py", *BASE, "--queued") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "mtr-test-qr", *WHERE, "--force", "--quiet"]]


def test_without_dry_run_the_same_commands_run(env):
    printed = dry(env, "teardown.py", *BASE) + dry(env, "logs.py", *BASE, "sft", "--no-follow")
    script(env, "teardown.py", *BASE)
    script(env, "logs.py", *BASE, "sft", "--no-follow")
    ran = [shlex.split(line) for line in open(env["_GCLOUD_LOG"]).read().splitlines()]
    assert ran == printed


@pytest.mark.parametrize(
    "name,args,msg",
    [
        ("create.py", [*BASE, "--type", "v9-8"], "unknown accelerator type 'v9-8'"),
        ("create.py", [*BASE, "--type", "v5litepod-12"], "slices come in sizes"),
        ("create.py", ["--type", "v4-8"], "missing setting(s): --zone / MTR_ZONE, --name / MTR_TPU_NAME"),
        ("setup_workers.py", [*BASE, "--type", "h100-8"], "unknown accelerator type"),
        ("launch.py", [*BASE, "--type", "v4-32", "sft", "--config", "c", "run.out_dir=runs/x"], "must be gs://"),
        ("launch.py", [*BASE, "--type", "v4-8", "train", "--config", "c"], "unknown stage 'train'"),
        ("copy_checkpoints.py", [*BASE, "--type", "v4-16", "--run-dir", "runs/x", "--dest", "o"], "use a gs:// run.out_dir"),
    ],
)
def test_bad_settings_exit_2(env, name, args, msg):
    for extra in (["--dry-run"], []):  # never reaches gcloud, dry run or not
        p = script(env, name, *args, *extra, check=False)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not os.path.exists(env["_GCLOUD_LOG"])
