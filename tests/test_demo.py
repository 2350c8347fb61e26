"""`mtr demo` end to end in its smoke configuration (every stage runs; learning is the full demo's job)."""

import json
import os
import subprocess
import sys

from util import REPO


def test_demo_small_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "mtr_jax.cli", "demo", "--small", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=1200, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert list(res) == ["untrained", "sft", "grpo"]
    for stage in res.values():
        assert set(stage) >= {"em", "f1", "n"} and stage["n"] == 8 and 0.0 <= stage["em"] <= 1.0
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "traces.jsonl").read_text().count("\n") >= 20
    # the export is a Hugging Face directory that transformers loads
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    tok = AutoTokenizer.from_pretrained(out / "hf")
    assert model.config.model_type == "qwen2" and len(tok) <= model.config.vocab_size
    assert "transformers reloaded the export" in r.stdout
    for stage in ("untrained", "sft", "grpo"):
        assert f"{stage:<12}" in r.stdout  # the table
    rows = [json.loads(l) for l in open(out / "grpo" / "metrics.jsonl")]
    assert [x["step"] for x in rows] == [1, 2] and "reward" in rows[0]
