"""`mtr report`: plots and summary from a metrics.jsonl like train/metrics.py writes."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from util import REPO


def _write_run(d, with_bad_line=True):
    from mtr_jax.train.metrics import MetricsLogger

    log = MetricsLogger(str(d), tensorboard=False)  # the writer the trainers use
    for s in range(1, 31):
        log.log(s, "sft", {"loss": 3.0 * math.exp(-s / 10), "lr": 1e-4, "grad_norm": 1.0 / s, "tokens_per_s": 1000 + s})
    rng = np.random.default_rng(0)
    for s in range(1, 41):
        ans = min(1.0, s / 40 + 0.1 * rng.standard_normal())
        log.log(s, "grpo", {"loss": 0.1 * rng.standard_normal(), "reward": ans + 0.2, "reward/answer": ans,
                            "reward/consistency": 0.2, "em": ans, "kl": 0.01 * s, "response_len": 50 + s,
                            "tool_calls": 1 + s / 20, "logprob_gap": 1e-4})
    log.close()
    if with_bad_line:
        with open(d / "metrics.jsonl", "a") as f:
            f.write('{"step": 41, "stage": "grpo", "loss"')  # a line cut by a kill
    (d / "results.json").write_text(json.dumps({"untrained": {"em": 0.0, "f1": 0.05, "n": 50}, "grpo": {"em": 0.5, "f1": 0.6, "n": 50}}))


def test_report_writes_pngs_and_summary(tmp_path):
    import matplotlib.image as mpimg

    from mtr_jax.report import make_report

    _write_run(tmp_path)
    res = make_report(tmp_path)
    names = {p.split("/")[-1] for p in res["pngs"]}
    assert {"loss.png", "reward.png", "em.png", "kl.png", "response_len.png", "tool_calls.png", "tokens_per_s.png",
            "lr.png", "grad_norm.png", "logprob_gap.png"} == names
    for p in res["pngs"]:
        img = mpimg.imread(p)
        assert img.shape[0] >= 300 and img.shape[1] >= 600
        assert img[..., :3].std() > 0.05  # not a blank canvas
    md = (tmp_path / "report" / "report.md").read_text()
    assert res["skipped"] == 1 and "1 unreadable line" in md
    # numbers in the table are those of the log (computed here independently)
    rows = {l.split("|")[1].strip(): l for l in md.split("## grpo")[1].splitlines() if l.startswith("| ")}
    kl = [0.01 * s for s in range(1, 41)]
    assert f"| kl | {kl[0]:.4g} | {kl[-1]:.4g} | {min(kl):.4g} | {max(kl):.4g} | {np.mean(kl[-4:]):.4g} |" == rows["kl"]
    sft_rows = {l.split("|")[1].strip(): l for l in md.split("## sft")[1].split("## grpo")[0].splitlines() if l.startswith("| ")}
    assert f"| {3.0 * math.exp(-30 / 10):.4g} |" in sft_rows["loss"]
    assert "| grpo | 0.5 | 0.6 | 50 |" in md and "![loss.png](loss.png)" in md


def test_reward_panel_has_components(tmp_path):
    from mtr_jax.report import _panel_keys

    panels = {n: keys for n, _, keys in _panel_keys({"reward", "reward/answer", "reward/format", "loss", "foo/bar"})}
    assert panels["reward"] == ["reward", "reward/answer", "reward/format"]
    assert panels["foo_bar"] == ["foo/bar"]


def test_cli(tmp_path):
    _write_run(tmp_path, with_bad_line=False)
    p = subprocess.run([sys.executable, "-m", "mtr_jax.cli", "report", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "report" / "loss.png").exists()
    p = subprocess.run([sys.executable, "-m", "mtr_jax.cli", "report", str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2 and "not found" in p.stderr and "Traceback" not in p.stderr


def test_empty_metrics_is_an_error(tmp_path):
    from mtr_jax.errors import MtrError
    from mtr_jax.report import make_report

    (tmp_path / "metrics.jsonl").write_text("garbage\n")
    with pytest.raises(MtrError, match="no metric records"):
        make_report(tmp_path)


def test_fresh_run_replaces_its_stage_and_keeps_the_other(tmp_path):
    """A second SFT run (no resume) into the same directory replaces the first SFT run's lines; a
    GRPO run that follows keeps the SFT lines; a resumed run appends."""
    from mtr_jax.train.metrics import MetricsLogger

    def run(stage, steps, resume=None, val=0.0):
        log = MetricsLogger(str(tmp_path), resume_step=resume, tensorboard=False)
        for s in steps:
            log.log(s, stage, {"loss": val})
        log.close()

    def rows():
        return [(r["stage"], r["step"], r["loss"]) for r in map(json.loads, open(tmp_path / "metrics.jsonl"))]

    run("sft", [1, 2, 3], val=1.0)
    run("sft", [1, 2], val=2.0)
    assert rows() == [("sft", 1, 2.0), ("sft", 2, 2.0)]
    run("grpo", [1], val=3.0)
    assert rows() == [("sft", 1, 2.0), ("sft", 2, 2.0), ("grpo", 1, 3.0)]
    run("grpo", [2], resume=1, val=4.0)
    assert rows()[-2:] == [("grpo", 1, 3.0), ("grpo", 2, 4.0)]
