"""`mtr bench grpo` plumbing, without tunix: the missing-venv error, the peer's protocol (spec in,
one JSON line out) with a stub peer, and the combined JSON object. Never runs tunix (the real
comparison is a report, not a test)."""

from __future__ import annotations

import argparse
import ast
import json
import os
import stat
import sys
import textwrap

import pytest

from mtr_jax.bench import grpo
from mtr_jax.errors import MtrError

# The stub peer reads the spec like the real one: it tokenizes the prompt TEXTS with the saved
# tokenizer directory (transformers, in a fresh process) and reports whether it got our ids.
STUB_PEER = """
import json, sys, time
from transformers import AutoTokenizer
spec = json.load(open(sys.argv[1]))
tok = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
match = [tok.encode(p) for p in spec["prompts"]] == spec["prompt_ids"]
n = spec["iters"]
print("some log line")
print(json.dumps({"peer_name": "stub 0.0 GRPOLearner", "iteration_s": [2.0] * n, "warmup_s": [9.0] * spec["warmup"],
                  "iterations_per_s": 0.5, "rollout_s": 0.5, "update_s": 1.5, "completion_len": spec["max_new_tokens"],
                  "prompt_ids_match": match, "versions": {"stub": "0.0"},
                  "seen": {k: spec[k] for k in ("batch_size", "group_size", "max_new_tokens", "beta", "eos_ids")},
                  "model": spec["model"]}))
"""


def _fake_python(tmp_path, body: str) -> str:
    """An executable standing in for tunix's python: called as `<it> PEER_SCRIPT SPEC`."""
    script = tmp_path / "stub_peer.py"
    script.write_text(textwrap.dedent(body))
    exe = tmp_path / "python"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$2"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(exe)


def test_missing_tunix_venv_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("MTR_TUNIX_PYTHON", raising=False)
    with pytest.raises(MtrError) as e:
        grpo.run(argparse.Namespace(quick=True, dtype=None, json=True))
    msg = str(e.value)
    assert "MTR_TUNIX_PYTHON" in msg and "pip install google-tunix==" in msg and "\n" not in msg
    monkeypatch.setenv("MTR_TUNIX_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(MtrError, match="not an executable file"):
        grpo.run(argparse.Namespace(quick=True, dtype=None, json=True))


def test_failing_peer_is_an_mtr_error(tmp_path):
    exe = _fake_python(tmp_path, "import sys\nprint('Traceback ...', file=sys.stderr)\n"
                                 "print(\"ModuleNotFoundError: No module named 'tunix'\", file=sys.stderr)\nsys.exit(1)\n")
    with pytest.raises(MtrError, match="No module named 'tunix'.*pip install google-tunix"):
        grpo.run_peer(exe, {"platform": "cpu"})


def test_peer_script_stands_alone():
    """The peer runs in tunix's venv: it must not import mtr_jax, and must drive GRPOLearner."""
    src = grpo.PEER_SCRIPT.read_text()
    tree = ast.parse(src)
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.startswith("mtr_jax") for m in mods)
    assert "tunix.rl.grpo" in mods and "GRPOLearner(" in src and "learner.train(" in src


def test_bench_json_with_stub_peer(monkeypatch, tmp_path):
    # tiny shape and sizes: this checks the plumbing and our side actually running, not speed
    monkeypatch.setattr(grpo, "ARCH", dict(grpo.ARCH, hidden_size=64, intermediate_size=128, num_hidden_layers=2))
    monkeypatch.setattr(grpo, "QUICK", dict(batch_size=2, group_size=2, max_new_tokens=8, warmup=1, iters=1))
    monkeypatch.setenv("MTR_TUNIX_PYTHON", _fake_python(tmp_path, STUB_PEER))
    out = grpo.run(argparse.Namespace(quick=True, dtype=None, json=True))
    json.dumps(out)
    for k in ("workload", "unit", "ours", "peer", "peer_name", "ratio", "device", "rollout_s", "update_s"):
        assert k in out, k
    assert out["workload"] == "grpo" and out["unit"] == "iterations/s" and out["peer"] == 0.5
    assert out["ours"] > 0 and out["ratio"] == pytest.approx(out["ours"] / 0.5, rel=1e-2)
    assert len(out["iteration_s"]) == 1 and out["rollout_s"] > 0 and out["update_s"] > 0
    # ours never generates more than N tokens per episode
    assert 0 < out["completion_len"] <= 8
    assert out["batch"]["B"] == 2 and out["batch"]["G"] == 2 and out["batch"]["max_turns"] == 1
    assert out["shape"]["hidden_size"] == 64 and out["shape"]["vocab_size"] % 64 == 0


def test_peer_tokenizing_differently_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(grpo, "ARCH", dict(grpo.ARCH, hidden_size=64, intermediate_size=128, num_hidden_layers=2))
    monkeypatch.setattr(grpo, "QUICK", dict(batch_size=2, group_size=2, max_new_tokens=4, warmup=1, iters=1))
    body = STUB_PEER.replace('match = [tok.encode(p) for p in spec["prompts"]] == spec["prompt_ids"]',
                             "match = [tok.encode(p + ' x') for p in spec['prompts']] == spec['prompt_ids']")
    monkeypatch.setenv("MTR_TUNIX_PYTHON", _fake_python(tmp_path, body))
    monkeypatch.setattr(grpo, "run_ours", lambda *a, **k: {"iteration_s": [1.0], "warmup_s": [1.0], "iterations_per_s": 1.0,
                                                             "rollout_s": 0.5, "update_s": 0.5, "completion_len": 4.0})
    with pytest.raises(MtrError, match="tokenized the prompts differently"):
        grpo.run(argparse.Namespace(quick=True, dtype=None, json=True))


def test_cli_exit_2_without_tunix(monkeypatch, capsys):
    from mtr_jax.cli import main

    monkeypatch.delenv("MTR_TUNIX_PYTHON", raising=False)
    assert main(["bench", "grpo", "--json"]) == 2
    err = capsys.readouterr()
    assert err.out == "" and len(err.err.strip().splitlines()) == 1 and "MTR_TUNIX_PYTHON" in err.err
