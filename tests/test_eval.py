"""`mtr eval` end to end on a tiny random model over 5 records of each dataset fixture, and resume."""

import json
import os
import subprocess
import sys

from util import REPO

FIX = os.path.join(REPO, "tests", "fixtures", "data")


def _config(tmp_path, tok_dir):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"""
model:
  preset: tiny
  tokenizer: {tok_dir}
  arch: {{vocab_size: 1536}}
data:
  datasets:
    - {{name: hotpotqa, path: {FIX}/hotpotqa/original_format.jsonl}}
    - {{name: musique, path: {FIX}/musique/dev.jsonl}}
    - {{name: 2wikimultihopqa, path: {FIX}/2wikimultihopqa/dev.jsonl}}
    - {{name: bamboogle, path: {FIX}/bamboogle/test.jsonl}}
eval: {{max_turns: 2, max_new_tokens: 8, max_len: 1024, batch_size: 5}}
run: {{out_dir: {tmp_path / 'run'}}}
""")
    return cfg


def _mtr(*args):
    return subprocess.run([sys.executable, "-m", "mtr_jax.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_eval_end_to_end_and_resume(tmp_path):
    from mtr_jax.data.demo_tokenizer import train_demo_tokenizer

    tok_dir = tmp_path / "tok"
    train_demo_tokenizer(["Where was the director of the film born? Paris, France."] * 4, vocab_size=300, out_dir=tok_dir)
    cfg = _config(tmp_path, tok_dir)
    out = tmp_path / "eval"
    r = _mtr("eval", "--config", str(cfg), "--limit", "5", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    for name in ("hotpotqa", "musique", "2wikimultihopqa", "bamboogle"):
        assert res[name]["n"] == 5, res
        rows = [json.loads(l) for l in open(out / f"{name}.jsonl")]
        assert len(rows) == 5 and {"question", "golds", "prediction", "em", "f1", "turns", "tool_calls", "trace"} <= set(rows[0])
        assert name in r.stdout
    assert "average" in res and "EM" in r.stdout and "invalid" in r.stdout
    # a second run finds every id done: nothing is redone, the table is the same
    before = {n: (out / f"{n}.jsonl").read_text() for n in ("hotpotqa", "bamboogle")}
    r2 = _mtr("eval", "--config", str(cfg), "--limit", "5", "--out", str(out))
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert {n: (out / f"{n}.jsonl").read_text() for n in before} == before
    assert json.loads((out / "results.json").read_text())["average"] == res["average"]


def test_eval_skips_and_counts_malformed_records(tmp_path):
    from mtr_jax.data.demo_tokenizer import train_demo_tokenizer

    tok_dir = tmp_path / "tok"
    train_demo_tokenizer(["a question and an answer"] * 4, vocab_size=300, out_dir=tok_dir)
    bad = tmp_path / "bamboogle.jsonl"
    good = open(os.path.join(FIX, "bamboogle", "test.jsonl")).read().splitlines()[:2]
    bad.write_text("\n".join(good + ['{"id": "x", "question": "no answer here"}', "not json"]) + "\n")
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model: {{preset: tiny, tokenizer: {tok_dir}}}\n"
                   f"data: {{datasets: [{{name: bamboogle, path: {bad}}}]}}\n"
                   f"eval: {{max_turns: 1, max_new_tokens: 4, max_len: 512}}\n")
    r = _mtr("eval", "--config", str(cfg), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["bamboogle"]["n"] == 2 and res["bamboogle"]["skipped_malformed"] == 2


def test_eval_bad_input(tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("data: {datasets: [{name: nosuchset, path: /nonexistent.jsonl}]}\nmodel: {tokenizer: /nonexistent}\n")
    r = _mtr("eval", "--config", str(cfg))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
