"""Kill anywhere: SFT and GRPO runs SIGKILLed at 5 moments each (4 drawn at random: a random step
past the last checkpoint, a random moment inside it; one the instant a checkpoint save is under
way), each time restarted the way a user would (`resume` when a checkpoint exists, else from scratch), end bitwise equal to an uninterrupted
run, with every step logged exactly once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_train import GRPO_SETUP, SFT_SETUP
from util import REPO

RUNNER = SFT_SETUP + GRPO_SETUP + r"""
import os, sys, time
from mtr_jax.train.checkpoint import Checkpointer
run, stage = sys.argv[1], sys.argv[2]
ck = os.path.join(run, "checkpoints")
resume = os.path.isdir(ck) and Checkpointer(ck, read_only=True).latest_step() is not None
if stage == "sft":
    cfg, mc, params, examples = sft_setting(run, steps=12)
    print("READY", flush=True)
    t = time.perf_counter()
    got, _ = train_sft(cfg, mc, params, examples, run, resume=resume, progress=False)
else:
    cfg, mc, params, tok, train, actor, tm = grpo_setting(run, steps=6)
    print("READY", flush=True)
    t = time.perf_counter()
    got = train_grpo(cfg, mc, params, tok, train, actor, tm, run, resume=resume, progress=False)
flat = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree_util.tree_leaves(got)])
np.save(os.path.join(run, "final.npy"), flat)
print("TRAIN_S", time.perf_counter() - t, flush=True)
"""


def _start(run, stage):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(run), stage], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_ready(p):
    for line in p.stdout:
        if line.startswith("READY"):
            return True
    return False


def _saving(run) -> bool:
    """An orbax save in flight: its temporary step directory exists."""
    try:
        return any("tmp" in n for n in os.listdir(os.path.join(run, "checkpoints")))
    except FileNotFoundError:
        return False


def _last_step(run) -> int:
    try:
        return max((int(d) for d in os.listdir(os.path.join(run, "checkpoints")) if d.isdigit()), default=0)
    except FileNotFoundError:
        return 0


def _logged(run) -> int:
    """The last step in metrics.jsonl (the run writes it as each step ends)."""
    try:
        lines = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(l).get("step", 0) for l in lines[-3:] if l.strip().endswith("}")]
    return max(steps, default=0)


def _finish(p):
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return out


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_sigkill_at_random_moments_resumes_bitwise(tmp_path, stage):
    ref = tmp_path / "ref"
    p = _start(ref, stage)
    out = _finish(p)
    train_s = float([l for l in out.splitlines() if l.startswith("TRAIN_S")][0].split()[1])
    want = np.load(ref / "final.npy")

    cut = tmp_path / "cut"
    n = 12 if stage == "sft" else 6
    rng = random.Random(1234 if stage == "sft" else 4321)
    moments, kills, mid_save = [], 0, False
    for k in range(5):
        p = _start(cut, stage)
        assert _wait_ready(p), p.stderr.read()[-3000:]
        if k == 2:  # the instant a checkpoint save is under way
            t0 = time.perf_counter()
            while p.poll() is None and not _saving(cut) and time.perf_counter() - t0 < 300:
                time.sleep(0.001)
            mid_save = p.poll() is None and _saving(cut)
            moments.append("mid-save")
        else:  # a random step past the last checkpoint, and a random moment inside it
            # A kill inside the last step can land after its checkpoint (before the run exits); then
            # no step is left past the last checkpoint and the moment is one inside the final step.
            target = rng.randint(min(_last_step(cut) + 1, n - 1), n - 1)
            t0 = time.perf_counter()
            while p.poll() is None and _logged(cut) < target and time.perf_counter() - t0 < 300:
                time.sleep(0.002)
            delay = rng.uniform(0.0, 1.0) * train_s / n
            moments.append(f"step {target + 1} +{delay:.2f}s")
            time.sleep(delay)
        if p.poll() is not None:  # it finished before the moment came
            _finish(p)
            break
        moments[-1] = (moments[-1], f"after ckpt {_last_step(cut)}")
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        assert p.returncode == -9
        kills += 1
    else:
        _finish(_start(cut, stage))
    if not (cut / "final.npy").exists():
        _finish(_start(cut, stage))
    print(stage, "killed at", moments)
    assert kills >= 4 and mid_save, (kills, moments, mid_save)
    got = np.load(cut / "final.npy")
    assert np.array_equal(got, want), (moments, float(np.max(np.abs(got - want))))
    steps = [json.loads(line)["step"] for line in open(cut / "metrics.jsonl")]
    assert steps == list(range(1, n + 1)), (steps, moments)
