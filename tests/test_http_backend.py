"""ToolActor's OpenAI-compatible HTTP backend (mtr_jax.llm.http, the openai SDK) against a local stub
server on 127.0.0.1 that returns 500s, 429s with Retry-After, timeouts, invalid JSON and invalid
observations (fault injection; the real server is tests/test_serve.py): retries with backoff, then
schema-valid error observations; counters show it; the API key is sent but never appears in any output."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mtr_jax.config import ToolsConfig
from mtr_jax.data.records import Paragraph, QARecord
from mtr_jax.tools.schema import validate_observation
from mtr_jax.tools.toolactor import ToolActor
from mtr_jax.tools.toolmaker import SEARCH, template_tools

KEY = "sk-test-not-a-real-key-42"
GOOD = {"results": [{"title": "Acme", "text": "Acme was founded by Jane Roe."}]}


class _Stub(BaseHTTPRequestHandler):
    hits: dict = {}
    auth: list = []
    prompts: list = []
    bodies: list = []
    lock = threading.Lock()
    inflight = 0  # "slow" requests being served right now, and the most at once
    max_inflight = 0

    def log_message(self, *a):  # keep test output quiet
        pass

    def do_POST(self):
        mode = self.path.strip("/").split("/")[0]
        _Stub.hits[mode] = _Stub.hits.get(mode, 0) + 1
        n = _Stub.hits[mode]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.auth.append(self.headers.get("Authorization"))
        _Stub.prompts.append("\n".join(m["content"] for m in body["messages"]))
        _Stub.bodies.append(body)
        if mode == "ratelimit" and n == 1:
            return self._send(429, b'{"error": "slow down"}', {"Retry-After": "1"})
        if mode == "e500" or (mode == "flaky" and n <= 2):
            return self._send(500, b'{"error": "boom"}')
        if mode == "e401":
            return self._send(401, b'{"error": "bad key"}')
        if mode == "timeout":
            time.sleep(0.6)
            return self._send(200, b"{}")
        if mode == "hangup":  # close the connection without a status line
            self.close_connection = True
            return None
        if mode == "badjson":
            return self._send(200, b"<html>not json")
        if mode == "badobs":
            return self._reply("I am not sure, maybe Jane?" if n % 2 else json.dumps({"results": "Jane"}))
        if mode == "slow":
            with _Stub.lock:
                _Stub.inflight += 1
                _Stub.max_inflight = max(_Stub.max_inflight, _Stub.inflight)
            time.sleep(0.3)
            with _Stub.lock:
                _Stub.inflight -= 1
        return self._reply("Sure:\n```json\n" + json.dumps(GOOD) + "\n```")

    def _reply(self, content: str):
        self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode())

    def _send(self, code: int, data: bytes, headers: dict | None = None):
        try:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out first
            pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def record():
    return QARecord(id="h1", question="Who founded Acme?", golds=["Jane Roe"], dataset="x",
                    context=[Paragraph("Acme", ["Acme was founded by Jane Roe."])])


def _actor(server, mode, monkeypatch, **kw):
    monkeypatch.setenv("MTR_TEST_KEY", KEY)
    cfg = ToolsConfig(toolactor="http", base_url=f"{server}/{mode}/v1", model_name="sim", api_key_env="MTR_TEST_KEY",
                      timeout_s=kw.pop("timeout_s", 2.0), retries=kw.pop("retries", 3), backoff_s=kw.pop("backoff_s", 0.02),
                      http_retries=kw.pop("http_retries", 0), **kw.pop("extra", {}))
    return ToolActor.from_config(cfg, cache_path=kw.pop("cache_path", None))


CALL = {"name": "search", "arguments": {"query": "Acme founder"}}


def test_success_sends_key_and_grounding(server, monkeypatch, record):
    actor = _actor(server, "ok", monkeypatch)
    obs = actor.observe(CALL, [SEARCH], record)
    assert obs.ok and obs.content == GOOD
    assert _Stub.auth[-1] == f"Bearer {KEY}"
    assert "Acme was founded by Jane Roe" in _Stub.prompts[-1]  # the simulator sees the record's documents
    assert '"query":"Acme founder"' in _Stub.prompts[-1]
    assert actor.counters["retries"] == 0 and actor.counters["errors"] == 0


@pytest.mark.parametrize("mode,transient,invalid", [("e500", 4, 0), ("timeout", 4, 0), ("hangup", 4, 0), ("badjson", 4, 0), ("badobs", 0, 4)])
def test_failures_retry_with_backoff_then_error_observation(server, monkeypatch, record, mode, transient, invalid):
    actor = _actor(server, mode, monkeypatch, retries=3, backoff_s=0.05, timeout_s=0.2)
    before = _Stub.hits.get(mode, 0)
    t0 = time.perf_counter()
    obs = actor.observe(CALL, [SEARCH], record)
    elapsed = time.perf_counter() - t0
    assert not obs.ok and obs.error == "tool_unavailable"
    assert validate_observation(SEARCH, obs.content) == []  # schema-valid error observation
    assert _Stub.hits[mode] - before == 4  # 1 try + 3 retries
    c = actor.counters
    assert (c["calls"], c["retries"], c["transient_failures"], c["invalid"], c["errors"]) == (1, 3, transient, invalid, 1)
    assert elapsed >= 0.05 + 0.1 + 0.2  # exponential backoff between the 4 attempts
    text = obs.text + json.dumps(c)
    assert KEY not in text
    if mode == "badobs":  # the validator's message went back to the simulator
        assert "Your reply was invalid" in _Stub.prompts[-1]


def test_sdk_retries_honour_retry_after(server, monkeypatch, record):
    """A 429 with Retry-After: 1 is retried by the openai SDK after that second, not by our loop."""
    actor = _actor(server, "ratelimit", monkeypatch, http_retries=2)
    t0 = time.perf_counter()
    obs = actor.observe(CALL, [SEARCH], record)
    assert obs.ok and obs.content == GOOD
    assert _Stub.hits["ratelimit"] == 2 and time.perf_counter() - t0 >= 1.0
    assert actor.counters["transient_failures"] == 0 and actor.counters["valid_first_try"] == 1


def test_request_shape_response_format_and_log(server, monkeypatch, record, tmp_path):
    """max_tokens always; response_format json_schema only when the server supports structured
    outputs; the request log holds the bodies and never the key."""
    log = tmp_path / "http.jsonl"
    plain = _actor(server, "ok", monkeypatch, extra={"max_tokens": 77, "http_log": str(log)})
    assert plain.observe(CALL, [SEARCH], record).ok
    body = _Stub.bodies[-1]
    assert body["max_tokens"] == 77 and body["temperature"] == 0 and "response_format" not in body
    assert body["model"] == "sim" and body["messages"][0]["role"] == "user"
    strict = _actor(server, "ok", monkeypatch, extra={"structured_outputs": True})
    assert strict.observe({"name": "search", "arguments": {"query": "other"}}, [SEARCH], record).ok
    rf = _Stub.bodies[-1]["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"]["required"] == ["results"]
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["ok"] and lines[0]["request"]["max_tokens"] == 77
    assert KEY not in log.read_text()


def test_flaky_server_recovers(server, monkeypatch, record):
    actor = _actor(server, "flaky", monkeypatch)
    obs = actor.observe(CALL, [SEARCH], record)
    assert obs.ok and obs.content == GOOD
    assert actor.counters["retries"] == 2 and actor.counters["transient_failures"] == 2 and actor.counters["errors"] == 0


def test_permanent_error_is_not_retried(server, monkeypatch, record):
    actor = _actor(server, "e401", monkeypatch)
    obs = actor.observe(CALL, [SEARCH], record)
    assert not obs.ok and obs.error == "backend_error" and "HTTP 401" in obs.content["error"]["message"]
    assert _Stub.hits["e401"] == 1 and actor.counters["retries"] == 0
    assert KEY not in obs.text


def test_batch_is_concurrent_and_failures_are_not_cached(server, monkeypatch, record, tmp_path):
    actor = _actor(server, "slow", monkeypatch, cache_path=tmp_path / "c.sqlite")
    tools = template_tools("bridge")
    items = [({"name": "search", "arguments": {"query": f"q{i}"}}, tools, record) for i in range(8)]
    items.append(({"name": "nope", "arguments": {}}, tools, record))
    _Stub.max_inflight = 0
    out = actor.observe_batch(items)
    assert [o.ok for o in out] == [True] * 8 + [False] and out[-1].error == "unknown_tool"
    # concurrent: the server was serving several of the 8 requests at once (counted by the server,
    # not timed: a wall-clock bound failed under a loaded CPU, 1.46 s against 1.44)
    assert _Stub.max_inflight >= 4, _Stub.max_inflight
    again = actor.observe_batch(items[:8])
    assert all(o.cached for o in again)
    failing = _actor(server, "e500", monkeypatch, cache_path=tmp_path / "c.sqlite", retries=0)
    assert not failing.observe(CALL, [SEARCH], record).ok
    assert not failing.observe(CALL, [SEARCH], record).cached  # a transient failure is retried on re-runs


def test_local_generate_hook(record):
    """tools.toolactor=llm: a local model's generate(prompt) -> str (the sampler), same validation path."""
    replies = iter(['{"results": [{"title": "Acme"}]}', json.dumps(GOOD)])
    actor = ToolActor.from_config(ToolsConfig(toolactor="llm", retries=2, backoff_s=0.0), generate=lambda p: next(replies))
    obs = actor.observe(CALL, [SEARCH], record)
    assert obs.ok and obs.content == GOOD and actor.counters["invalid"] == 1 and actor.counters["retries"] == 1
