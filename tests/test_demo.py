"""`mtr demo` end to end in its smoke configuration (every stage runs; learning is the full demo's job)."""

import json
import os
import subprocess
import sys

from util import REPO


def test_demo_small_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "mtr_jax.cli", "demo", "--tiny", "--small", "--out", str(out)], cwd=REPO,
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


def test_demo_arch_override_changes_one_field():
    """`arch.hidden_size=256` keeps every other arch default (it used to replace the whole dict, so
    the demo silently built Qwen2Config's 24-layer default shape)."""
    from mtr_jax.demo_tiny import DemoConfig, load_demo_config

    demo, _ = load_demo_config(None, ["arch.hidden_size=256"], False, "/tmp/unused")
    assert demo.arch == {**DemoConfig().arch, "hidden_size": 256}
    small, _ = load_demo_config(None, [], True, "/tmp/unused")
    assert small.arch["num_attention_heads"] == DemoConfig().arch["num_attention_heads"]
    assert small.arch["hidden_size"] == 64


def test_demo_bad_arch_is_a_one_line_error_exit_2(tmp_path):
    import pytest

    from mtr_jax.demo_tiny import load_demo_config
    from mtr_jax.errors import MtrError

    for bad, says in ((["arch.bogus=1"], "arch.bogus"), (["arch.hidden_size=abc"], "arch.hidden_size"),
                      (["arch.num_attention_heads=3"], "num_key_value_heads"), (["arch.vocab_size=64"], "arch.vocab_size")):
        with pytest.raises(MtrError, match=says):
            load_demo_config(None, bad, False, str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "mtr_jax.cli", "demo", "--tiny", "--out", str(tmp_path / "d"), "arch.bogus=1"], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2 and "arch.bogus" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "d").exists()  # rejected before any work


def test_grpo_pool_probe():
    """grpo_pool: "all" is every training question; "probe" is the ones the SFT model got wrong plus as
    many (seeded) of the ones it got right; a bad mode is a one-line MtrError before any work."""
    import pytest

    from mtr_jax import demo as D
    from mtr_jax.data.records import QARecord
    from mtr_jax.errors import MtrError

    qs = [QARecord(id=f"q{i}", question=f"Q{i}?", golds=["x"], dataset="d") for i in range(20)]
    rows = [{"id": q.id, "em": 0.0 if i in (3, 7, 11) else 1.0} for i, q in enumerate(qs)]
    assert D.grpo_pool("all", qs, None) == qs
    pool = D.grpo_pool("probe", qs, rows, seed=0)
    assert [q.id for q in pool[:3]] == ["q3", "q7", "q11"] and len(pool) == 6
    assert all(rows[int(q.id[1:])]["em"] == 1.0 for q in pool[3:]) and len({q.id for q in pool}) == 6
    assert D.grpo_pool("probe", qs, rows, seed=0) == pool  # seeded
    assert D.grpo_pool("probe", qs, [dict(r, em=1.0) for r in rows]) == qs  # nothing failed: every question
    with pytest.raises(MtrError, match="grpo_pool"):
        D.load_real_config(None, ["grpo_pool=some"], False, "/tmp/x")
