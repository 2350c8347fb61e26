"""ToolActor: answers a tool call with an observation that validates against the tool's `returns`.

    actor.observe({"name": ..., "arguments": {...}}, tools, record) -> Observation
    actor.observe_batch([(call, tools, record), ...]) -> [Observation, ...]   (one LLM batch)

Never raises on a bad call: unknown tool, invalid arguments, a failing or lying backend all become a
schema-valid error observation `{"error": {"code", "message"}}` (see tools.schema).

Backends:
- corpus (offline default, tools.corpus): BM25 (tools.bm25) over the record's own context or a corpus
  JSONL file, `lookup` by title, exact `compare` / `calculator` (tools.exact), seeded noise.
- llm / http: a model (mtr_jax.llm: the local sampler, constrained to the tool's schema, or an
  OpenAI-compatible server) simulates the tool from its definition, the arguments and the question's
  own documents. A turn's calls go to the model as one batch. A reply that does not validate goes
  back with the validator's message (up to `retries` times, backoff between attempts); what is still
  invalid or failing becomes an error observation. The model never sees the gold answer unless
  `tools.actor_sees_answer` is on (a training-time option, ZeroSearch-style; counted in
  `counters["answer_shown"]`; eval always turns it off).
Every result is cached in SQLite (tools.cache); transient failures are not, so a re-run retries them.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from mtr_jax.data.records import QARecord
from mtr_jax.errors import MtrError
from mtr_jax.llm import BackendError, as_llm
from mtr_jax.tools.cache import ObservationCache, cache_key
from mtr_jax.tools.corpus import CorpusBackend
from mtr_jax.tools.json_extract import extract_json
from mtr_jax.tools.schema import (
    ERROR_SCHEMA,
    canonical_json,
    error_observation,
    validate_arguments,
    validate_observation,
)


@dataclass
class Observation:
    content: dict  # valid against the tool's `returns` (or ERROR_SCHEMA for an unknown tool)
    ok: bool
    error: str | None = None  # error code when not ok
    cached: bool = False

    @property
    def text(self) -> str:
        """The tool message content (one spelling: traces.render.observation_text)."""
        return json.dumps(self.content, ensure_ascii=False)


def _error(code: str, message: str) -> Observation:
    return Observation(error_observation(code, message), ok=False, error=code)


_SIM_PROMPT = """You simulate the tool "{name}": {description}
Arguments: {args}
{context}Reply with one JSON object only, valid against this JSON Schema:
{schema}"""

# what the corpus backend returns for a retrieval tool: a tool whose `returns` rejects it (and that
# is not calculator/compare) cannot be answered from the corpus
_CORPUS_PROBE = {"results": [{"title": "t", "text": "x"}]}


def _success_schema(returns: dict) -> dict:
    branches = [b for b in returns.get("anyOf", []) if b != ERROR_SCHEMA]
    return branches[0] if len(branches) == 1 else returns


@dataclass
class _Call:
    """A validated call waiting for its observation."""
    defn: dict
    args: dict
    record: QARecord | None
    key: str
    context_id: str


class ToolActor:
    def __init__(
        self,
        backend: str = "corpus",
        *,
        top_k: int = 3,
        noise: float = 0.0,
        seed: int = 0,
        retries: int = 3,
        cache_path: str | pathlib.Path | None = None,
        llm=None,
        complete=None,
        corpus_path: str = "",
        backoff_s: float = 0.5,
        backend_id: str = "",
        max_tokens: int = 384,
        sees_answer: bool = False,
    ):
        if backend not in ("corpus", "llm", "http"):
            raise MtrError(f"tools.toolactor: unknown backend {backend!r} (corpus | llm | http)")
        llm = as_llm(llm if llm is not None else complete)
        if backend in ("llm", "http") and llm is None:
            raise MtrError(f"tools.toolactor={backend} needs a model: set tools.llm (a local model) or tools.base_url")
        if not 0.0 <= noise <= 1.0:
            raise MtrError(f"tools.noise must be in [0, 1], got {noise}")
        self.backend, self.noise, self.seed, self.retries = backend, noise, seed, max(0, retries)
        self.backoff_s, self.max_tokens, self.sees_answer = backoff_s, int(max_tokens), bool(sees_answer)
        self.llm = llm
        self.corpus = CorpusBackend(top_k=top_k, corpus_path=corpus_path)
        if not backend_id:
            backend_id = f"corpus:k={top_k}:noise={noise}:seed={seed}" if backend == "corpus" else llm.name
        # a simulation that saw the answer is a different backend: never served from the same cache rows
        self.backend_id = backend_id + (":sees_answer" if self.sees_answer else "")
        self.cache = ObservationCache(cache_path) if cache_path else None
        self._lock = threading.Lock()
        self.counters = {k: 0 for k in (
            "calls", "cache_hits", "bad_call", "retries", "invalid", "errors", "transient_failures", "unknown_tool",
            "bad_arguments", "valid_first_try", "valid_after_retry", "replaced_by_error", "json_repaired",
            "answer_shown", "internal_error", "corpus_answered", "deduplicated")}

    @classmethod
    def from_config(cls, tools_cfg, cache_path=None, llm=None, seed: int = 0, generate=None,
                    sees_answer: bool | None = None) -> "ToolActor":
        """llm/http backends use `llm` if given, else the configured one (mtr_jax.llm.make_llm; http
        needs tools.base_url). `sees_answer`: None = tools.actor_sees_answer (eval passes False)."""
        backend = tools_cfg.toolactor
        llm = llm if llm is not None else generate
        if backend in ("llm", "http") and llm is None:
            if backend == "http" and not tools_cfg.base_url:
                raise MtrError("tools.toolactor=http needs tools.base_url (an OpenAI-compatible endpoint)")
            from mtr_jax.llm import make_llm

            llm = make_llm(tools_cfg)
        return cls(
            backend, top_k=tools_cfg.top_k, noise=tools_cfg.noise, seed=seed, retries=tools_cfg.retries,
            cache_path=cache_path or tools_cfg.cache or None, llm=llm, corpus_path=tools_cfg.corpus,
            backoff_s=tools_cfg.backoff_s, max_tokens=tools_cfg.max_tokens,
            sees_answer=tools_cfg.actor_sees_answer if sees_answer is None else sees_answer,
        )

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n

    # -- public API ---------------------------------------------------------------------------

    def observe(self, call: Any, tools: list[dict], record: QARecord | None = None) -> Observation:
        """Never raises: every failure is a schema-valid error observation."""
        return self.observe_batch([(call, tools, record)])[0]

    def observe_batch(self, items: list[tuple[Any, list[dict], QARecord | None]]) -> list[Observation]:
        out: list = [None] * len(items)
        waiting: list[tuple[int, _Call]] = []
        for i, (call, tools, record) in enumerate(items):
            self._count("calls")
            try:
                r = self._prepare(call, tools, record)
                if isinstance(r, _Call) and self.backend == "corpus":
                    self._count("corpus_answered")
                    r = self._finish(r, *self._produce_corpus(r))
            except Exception as e:  # last line of defence: a rollout must go on
                self._count("internal_error")
                r = _error("internal_error", f"the tool failed ({type(e).__name__}); try another call")
            if isinstance(r, _Call):
                waiting.append((i, r))
            else:
                out[i] = r
        if waiting:
            unique: dict[str, _Call] = {}
            for _, c in waiting:  # the same call twice in one batch is produced once
                unique.setdefault(c.key, c)
            self._count("deduplicated", len(waiting) - len(unique))
            calls = list(unique.values())
            try:
                produced = self._produce_llm(calls)
            except Exception as e:
                self._count("internal_error", len(calls))
                produced = [(_error("internal_error", f"the tool failed ({type(e).__name__}); try another call"), False)] * len(calls)
            by_key = {c.key: self._finish(c, obs, cacheable) for c, (obs, cacheable) in zip(calls, produced)}
            for i, c in waiting:
                out[i] = by_key[c.key]
        for obs in out:
            if not obs.ok:
                self._count("errors")
        return out

    def unanswerable(self, tool_sets) -> list[str]:
        """Names of tools (over `tool_sets`) this actor cannot answer: with the corpus backend, a tool
        that is not calculator/compare and whose `returns` rejects a list of documents. Model-backed
        actors simulate any tool."""
        if self.backend != "corpus":
            return []
        bad = set()
        for tools in tool_sets:
            for t in tools:
                name = t["function"]["name"]
                if name not in ("calculator", "compare") and validate_observation(t, _CORPUS_PROBE):
                    bad.add(name)
        return sorted(bad)

    # -- internals ------------------------------------------------------------------------------

    def _prepare(self, call: Any, tools: list[dict], record: QARecord | None):
        """-> an Observation (an error, or a cache hit) or the validated _Call to produce."""
        by_name = {t["function"]["name"]: t for t in tools or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)}
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            self._count("bad_call")
            return _error("bad_call", 'a call is {"name": <tool name>, "arguments": {...}}')
        name, args = call["name"], call.get("arguments", {})
        defn = by_name.get(name)
        if defn is None:
            self._count("unknown_tool")
            return _error("unknown_tool", f"there is no tool named {name[:64]!r}; available tools: {', '.join(sorted(by_name)) or 'none'}")
        probs = validate_arguments(defn, args)
        if probs:
            self._count("bad_arguments")
            return _error("invalid_arguments", "; ".join(probs))
        context_id = f"{record.dataset}/{record.id}" if record is not None else ""
        key = cache_key(self.backend_id, name, args, context_id)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self._count("cache_hits")
                content, ok, err = hit
                return Observation(content, ok, err, cached=True)
        return _Call(defn, args, record, key, context_id)

    def _finish(self, c: _Call, obs: Observation, cacheable: bool) -> Observation:
        if self.cache is not None and cacheable:
            self.cache.put(c.key, self.backend_id, c.defn["function"]["name"], c.args, c.context_id, obs.content, obs.ok, obs.error)
        return obs

    def _rng(self, key: str) -> random.Random:
        return random.Random(int(hashlib.sha256(f"{self.seed}:{key}".encode()).hexdigest()[:16], 16))

    def _produce_corpus(self, c: _Call) -> tuple[Observation, bool]:
        content = self.corpus.produce(c.defn, c.args, c.record, self._rng(c.key), self.noise)
        probs = validate_observation(c.defn, content)
        if probs:
            self._count("invalid")
            name = c.defn["function"]["name"]
            return _error("unsupported_tool", f"the corpus backend cannot answer {name!r}: {probs[0]}"), True
        err = content["error"]["code"] if "error" in content else None
        return Observation(content, ok=err is None, error=err), True

    def _prompt(self, c: _Call) -> str:
        fn = c.defn["function"]
        context = ""
        idx = self.corpus.index_for(c.record)
        if idx is not None:  # ground the simulation in the question's own documents
            query = " ".join(str(v) for v in c.args.values() if isinstance(v, (str, int, float)))
            hits = self.corpus.search(idx, query, 5)
            if hits:
                context = "Relevant documents:\n" + "\n".join(f"- {h['title']}: {h['text']}" for h in hits) + "\n"
        if self.sees_answer and c.record is not None and c.record.golds:
            self._count("answer_shown")
            context += (f"The question being researched is: {c.record.question}\nIts answer is: {c.record.golds[0]}\n"
                        "Return results that help find it.\n")
        return _SIM_PROMPT.format(name=fn["name"], description=fn.get("description", ""), args=canonical_json(c.args),
                                  context=context, schema=canonical_json(_success_schema(c.defn["returns"])))

    def _produce_llm(self, calls: list[_Call]) -> list[tuple[Observation, bool]]:
        """-> (observation, cacheable) per call. Transient failures are not cached: a re-run may succeed."""
        convs = [[{"role": "user", "content": self._prompt(c)}] for c in calls]
        schemas = [_success_schema(c.defn["returns"]) for c in calls]
        res: list = [None] * len(calls)
        last = ["no attempt"] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(self.retries + 1):
            if not todo:
                break
            if attempt:
                self._count("retries", len(todo))
                time.sleep(self.backoff_s * (2 ** (attempt - 1)))
            replies = self.llm.chat([convs[i] for i in todo], [schemas[i] for i in todo], max_tokens=self.max_tokens)
            again = []
            for i, reply in zip(todo, replies):
                if isinstance(reply, BackendError):
                    self._count("replaced_by_error")
                    res[i] = (_error("backend_error", f"the tool backend refused the call ({reply})"), False)
                    continue
                if isinstance(reply, Exception) or not isinstance(reply, str):
                    self._count("transient_failures")
                    last[i] = str(reply) if isinstance(reply, Exception) else "the model returned no text"
                    again.append(i)
                    continue
                try:
                    content, repaired = extract_json(reply, "{")
                    probs = validate_observation(calls[i].defn, content)
                except (ValueError, RecursionError) as e:
                    content, repaired, probs = None, False, [str(e)]
                if not probs:
                    self._count("json_repaired", int(repaired))
                    self._count("valid_first_try" if attempt == 0 else "valid_after_retry")
                    err = content["error"]["code"] if "error" in content else None
                    res[i] = (Observation(content, ok=err is None, error=err), True)
                    continue
                self._count("invalid")
                last[i] = f"invalid observation: {probs[0]}"
                convs[i] = convs[i] + [
                    {"role": "assistant", "content": reply},
                    {"role": "user", "content": "Your reply was invalid: " + "; ".join(probs[:3])
                     + "\nReply with the corrected JSON object only."},
                ]
                again.append(i)
            todo = again
        for i in todo:
            self._count("replaced_by_error")
            res[i] = (_error("tool_unavailable", f"the tool gave no valid observation after {self.retries + 1} attempts "
                                                 f"({last[i][:200]})"), False)
        return res
