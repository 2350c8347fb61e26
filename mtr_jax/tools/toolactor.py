"""ToolActor: answers a tool call with an observation that validates against the tool's `returns`.

    actor.observe({"name": ..., "arguments": {...}}, tools, record) -> Observation
    actor.observe_batch([(call, tools, record), ...]) -> [Observation, ...]   (threads for HTTP/LLM)

Never raises on a bad call: unknown tool, invalid arguments, a failing or lying backend all become a
schema-valid error observation `{"error": {"code", "message"}}` (see tools.schema).

Backends (one interface, `_produce`):
- corpus (offline default): Okapi BM25 over the sentences of the record's own context (or of a
  corpus JSONL file of {"title", "text"}), `lookup` by title, and exact `compare` / `calculator`.
- llm: a model prompted to emit the observation JSON — `generate(prompt) -> str` (a local model
  through our sampler) or an OpenAI-compatible HTTP endpoint (`HttpChat`).
Noise injection replaces a seeded share of retrieved results by irrelevant ones. Invalid observations
and transient HTTP failures (5xx, 429, timeouts, unreadable responses) are retried with exponential
backoff, then replaced by an error observation. Every result is cached in SQLite (tools.cache).
"""

from __future__ import annotations

import ast
import hashlib
import http.client
import json
import math
import operator
import os
import pathlib
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from mtr_jax.data.records import QARecord
from mtr_jax.errors import MtrError
from mtr_jax.tools.cache import ObservationCache, cache_key
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


# ---------------------------------------------------------------------------------------------
# Ranking: Okapi BM25 (Robertson et al.; k1=1.5, b=0.75, idf = ln(1 + (N - n + .5) / (n + .5))).

_WORD = re.compile(r"\w+", re.UNICODE)
_STOP = frozenset(
    "a an the of in on at to for from by with and or is are was were be been what which who whom whose when "
    "where why how did does do that this these those as it its".split()
)


def words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


class BM25:
    def __init__(self, docs: list[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.tfs = [Counter(words(d)) for d in docs]
        self.lens = [sum(tf.values()) for tf in self.tfs]
        self.avg = (sum(self.lens) / len(self.lens)) if self.lens else 1.0
        df: Counter = Counter()
        for tf in self.tfs:
            df.update(tf.keys())
        n = len(docs)
        self.idf = {w: math.log(1.0 + (n - c + 0.5) / (c + 0.5)) for w, c in df.items()}

    def scores(self, query: str) -> list[float]:
        q = words(query)
        out = []
        for tf, dl in zip(self.tfs, self.lens):
            s = 0.0
            norm = self.k1 * (1 - self.b + self.b * dl / (self.avg or 1.0))
            for w in q:
                f = tf.get(w)
                if f:
                    s += self.idf[w] * f * (self.k1 + 1) / (f + norm)
            out.append(s)
        return out

    def top(self, query: str, k: int) -> list[int]:
        sc = self.scores(query)
        order = sorted(range(len(sc)), key=lambda i: (-sc[i], i))  # ties: document order (deterministic)
        return [i for i in order[:k] if sc[i] > 0]


# ---------------------------------------------------------------------------------------------
# Exact utilities.

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> float:
    """Arithmetic only (numbers, + - * / // % **, parentheses); ValueError otherwise."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(b) > 64 or abs(a) > 1e6):
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](a, b)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError("only numbers and + - * / // % ** ( ) are allowed")

    try:
        value = ev(ast.parse(expression.replace(",", ""), mode="eval"))
    except (SyntaxError, ZeroDivisionError, OverflowError, RecursionError, TypeError) as e:
        raise ValueError(f"cannot evaluate: {type(e).__name__}") from None
    if not math.isfinite(value):
        raise ValueError("the result is not a finite number")
    return float(value)


_MONTHS = {m: i + 1 for i, m in enumerate(
    "january february march april may june july august september october november december".split())}
_MONTHS.update({m[:3]: i for m, i in list(_MONTHS.items())})


def comparable(value: str) -> tuple:
    """A date ('2 November 1932', 'July 23, 1968', '1974') as (year, month, day), else a number."""
    v = re.sub(r"(?<=\d),(?=\d{3}\b)", "", value.strip().lower()).replace(",", " ")  # 1,200 -> 1200
    year = re.search(r"\b(\d{3,4})\b", v)
    month = next((n for w, n in _MONTHS.items() if re.search(rf"\b{w}\b", v)), None)
    if year and month:
        day = re.search(r"\b(\d{1,2})\b", v.replace(year.group(1), " "))
        return (int(year.group(1)), month, int(day.group(1)) if day else 0)
    num = re.search(r"-?\d+(?:\.\d+)?", v)
    if num:
        return (float(num.group(0)),)
    raise ValueError(f"cannot read a number or a date from {value!r}")


def compare(a: str, b: str, relation: str) -> bool:
    x, y = comparable(a), comparable(b)
    if len(x) != len(y):
        raise ValueError("compare two dates or two numbers, not one of each")
    return {"earlier": x < y, "less": x < y, "later": x > y, "greater": x > y, "equal": x == y}[relation]


# ---------------------------------------------------------------------------------------------
# Corpus backend.


@dataclass
class _Index:
    titles: list[str]  # per paragraph
    paragraphs: list[str]
    units: list[tuple[int, str]]  # (paragraph index, sentence)
    bm25: BM25
    title_bm25: BM25


def _split_sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", text.strip())
    return [p for p in parts if p.strip()]


def build_index(paragraphs: list[tuple[str, list[str]]]) -> _Index:
    titles, texts, units = [], [], []
    for pi, (title, sents) in enumerate(paragraphs):
        sents = [s.strip() for s in sents if s and s.strip()]
        if len(sents) == 1 and len(sents[0]) > 300:
            sents = _split_sentences(sents[0])
        titles.append(title)
        texts.append(" ".join(sents))
        units += [(pi, s) for s in sents]
    # Each sentence is indexed with its title: entity names in queries match the page they name.
    bm25 = BM25([f"{titles[pi]} {s}" for pi, s in units])
    return _Index(titles, texts, units, bm25, BM25(titles))


def _norm_title(t: str) -> str:
    return " ".join(_WORD.findall(t.lower()))


class CorpusBackend:
    name = "corpus"

    def __init__(self, top_k: int = 3, corpus_path: str = "", max_chars: int = 1200):
        self.top_k, self.max_chars = top_k, max_chars
        self._indexes: dict[str, _Index] = {}
        self._lock = threading.Lock()
        self._file_index = self._load_corpus(corpus_path) if corpus_path else None

    @staticmethod
    def _load_corpus(path: str) -> _Index:
        p = pathlib.Path(path)
        if not p.exists():
            raise MtrError(f"tools.corpus: file not found: {p}")
        paras = []
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    paras.append((str(d["title"]), d["sentences"] if "sentences" in d else [str(d["text"])]))
                except (ValueError, KeyError, TypeError):
                    raise MtrError(f"{p} line {i}: expected a JSON object with 'title' and 'text' (or 'sentences')") from None
        if not paras:
            raise MtrError(f"{p}: the corpus is empty")
        return build_index(paras)

    def index_for(self, record: QARecord | None) -> _Index | None:
        if record is None or not record.context:
            return self._file_index
        key = f"{record.dataset}/{record.id}"
        with self._lock:
            idx = self._indexes.get(key)
            if idx is None:
                if len(self._indexes) > 256:
                    self._indexes.clear()
                idx = self._indexes[key] = build_index([(p.title, p.sentences) for p in record.context])
        return idx

    def _clip(self, text: str) -> str:
        return text if len(text) <= self.max_chars else text[: self.max_chars - 3] + "..."

    def search(self, idx: _Index, query: str, k: int) -> list[dict]:
        return [{"title": idx.titles[idx.units[i][0]], "text": idx.units[i][1]} for i in idx.bm25.top(query, k)]

    def lookup(self, idx: _Index, title: str) -> list[dict]:
        want = _norm_title(title)
        hits = [i for i, t in enumerate(idx.titles) if _norm_title(t) == want]
        if not hits:
            hits = idx.title_bm25.top(title, 1)
        return [{"title": idx.titles[i], "text": self._clip(idx.paragraphs[i])} for i in hits[:1]]

    def produce(self, defn: dict, args: dict, record: QARecord | None, rng: random.Random, noise: float) -> dict:
        name = defn["function"]["name"]
        if name == "calculator":
            try:
                return {"value": calculate(str(args.get("expression", "")))}
            except ValueError as e:
                return error_observation("bad_expression", f"{e}; write arithmetic like 2019 - 1987")
        if name == "compare":
            try:
                return {"result": compare(str(args["a"]), str(args["b"]), str(args["relation"])), "a": args["a"], "b": args["b"]}
            except (ValueError, KeyError) as e:
                return error_observation("bad_value", f"{e}; pass two dates or two numbers")
        idx = self.index_for(record)
        if idx is None:
            return error_observation("no_corpus", "no documents to search for this question")
        if name == "lookup" and "title" in args:
            results = self.lookup(idx, str(args["title"]))
            if not results:
                return {"results": []}
        else:  # search, and any retrieval-shaped tool: query = its string arguments
            query = " ".join(str(v) for v in args.values() if isinstance(v, (str, int, float)))
            results = self.search(idx, query, self.top_k)
        if noise > 0 and results:
            results = self._inject_noise(idx, results, rng, noise)
        return {"results": results}

    @staticmethod
    def _inject_noise(idx: _Index, results: list[dict], rng: random.Random, noise: float) -> list[dict]:
        shown = {(r["title"], r["text"]) for r in results}
        titles = {r["title"] for r in results}
        pool = [(idx.titles[pi], s) for pi, s in idx.units if idx.titles[pi] not in titles and (idx.titles[pi], s) not in shown]
        out = []
        for r in results:
            if pool and rng.random() < noise:
                t, s = pool.pop(rng.randrange(len(pool)))
                out.append({"title": t, "text": s})
            else:
                out.append(r)
        return out


# ---------------------------------------------------------------------------------------------
# LLM backends.


class TransientError(Exception):
    """Worth retrying: HTTP 5xx/429, timeouts, connection errors, unreadable responses."""


class BackendError(Exception):
    """Not worth retrying (e.g. HTTP 401/404)."""


class HttpChat:
    """Minimal OpenAI-compatible `/v1/chat/completions` client (stdlib only). One attempt per call;
    ToolActor owns retries. The API key is read from the environment and never logged."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 30.0):
        if not base_url:
            raise MtrError("tools.base_url is empty: set an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
        base = base_url.rstrip("/")
        self.url = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.model, self.api_key_env, self.timeout_s = model, api_key_env, timeout_s
        host = urllib.parse.urlparse(self.url).hostname or ""
        handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
        self._opener = urllib.request.build_opener(*handlers)

    @classmethod
    def from_config(cls, tools_cfg) -> "HttpChat":
        return cls(tools_cfg.base_url, tools_cfg.model_name, tools_cfg.api_key_env, tools_cfg.timeout_s)

    def complete(self, prompt: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            if e.code >= 500 or e.code == 429:
                raise TransientError(f"HTTP {e.code} from {self.url}") from None
            raise BackendError(f"HTTP {e.code} from {self.url}") from None
        except (urllib.error.URLError, TimeoutError, socket.timeout, OSError, http.client.HTTPException) as e:
            raise TransientError(f"no response from {self.url} ({type(e).__name__})") from None
        try:
            return json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise TransientError(f"unreadable response from {self.url} (not an OpenAI chat completion)") from None


_SIM_PROMPT = """You simulate the tool "{name}": {description}
Arguments: {args}
{context}Reply with one JSON object only, valid against this JSON Schema:
{schema}"""


def _success_schema(returns: dict) -> dict:
    branches = [b for b in returns.get("anyOf", []) if b != ERROR_SCHEMA]
    return branches[0] if len(branches) == 1 else returns


def extract_json_object(text: str) -> Any:
    """First JSON object in a model reply (tolerates prose or ``` fences around it)."""
    i = text.find("{")
    while i >= 0:
        try:
            return json.JSONDecoder().raw_decode(text[i:])[0]
        except ValueError:
            i = text.find("{", i + 1)
    raise ValueError("no JSON object in the reply")


# ---------------------------------------------------------------------------------------------
# The actor.


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
        complete: Callable[[str], str] | None = None,
        corpus_path: str = "",
        backoff_s: float = 0.5,
        max_workers: int = 8,
        backend_id: str = "",
    ):
        if backend not in ("corpus", "llm", "http"):
            raise MtrError(f"tools.toolactor: unknown backend {backend!r} (corpus | llm | http)")
        if backend in ("llm", "http") and complete is None:
            raise MtrError(f"tools.toolactor={backend} needs a model: a generate(prompt) callable or tools.base_url")
        if not 0.0 <= noise <= 1.0:
            raise MtrError(f"tools.noise must be in [0, 1], got {noise}")
        self.backend, self.noise, self.seed, self.retries = backend, noise, seed, max(0, retries)
        self.backoff_s, self.max_workers = backoff_s, max_workers
        self.complete = complete
        self.corpus = CorpusBackend(top_k=top_k, corpus_path=corpus_path)
        self.backend_id = backend_id or (f"corpus:k={top_k}:noise={noise}:seed={seed}" if backend == "corpus" else backend)
        self.cache = ObservationCache(cache_path) if cache_path else None
        self._lock = threading.Lock()
        self.counters = {k: 0 for k in ("calls", "cache_hits", "retries", "invalid", "errors", "transient_failures",
                                        "unknown_tool", "bad_arguments")}

    @classmethod
    def from_config(cls, tools_cfg, cache_path=None, generate: Callable[[str], str] | None = None, seed: int = 0) -> "ToolActor":
        """`generate` is the local-model hook (tools.toolactor=llm); http uses tools.base_url."""
        backend = tools_cfg.toolactor
        complete, backend_id = None, ""
        if backend == "http":
            chat = HttpChat.from_config(tools_cfg)
            complete, backend_id = chat.complete, f"http:{tools_cfg.model_name}"
        elif backend == "llm":
            complete, backend_id = generate, "llm:local"
        return cls(
            backend, top_k=tools_cfg.top_k, noise=tools_cfg.noise, seed=seed, retries=tools_cfg.retries,
            cache_path=cache_path or tools_cfg.cache or None, complete=complete,
            corpus_path=getattr(tools_cfg, "corpus", ""), backoff_s=getattr(tools_cfg, "backoff_s", 0.5),
            backend_id=backend_id,
        )

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n

    # -- public API ---------------------------------------------------------------------------

    def observe(self, call: Any, tools: list[dict], record: QARecord | None = None) -> Observation:
        """Never raises: every failure is a schema-valid error observation."""
        self._count("calls")
        try:
            obs = self._observe(call, tools, record)
        except Exception as e:  # last line of defence: a rollout must go on
            obs = _error("internal_error", f"the tool failed ({type(e).__name__}); try another call")
        if not obs.ok:
            self._count("errors")
        return obs

    def observe_batch(self, items: list[tuple[Any, list[dict], QARecord | None]]) -> list[Observation]:
        if self.backend == "corpus" or len(items) <= 1:
            return [self.observe(*it) for it in items]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(items))) as pool:
            return list(pool.map(lambda it: self.observe(*it), items))

    # -- internals ------------------------------------------------------------------------------

    def _observe(self, call: Any, tools: list[dict], record: QARecord | None) -> Observation:
        by_name = {t["function"]["name"]: t for t in tools or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)}
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
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
        obs, cacheable = self._produce(defn, args, record, key)
        if self.cache is not None and cacheable:
            self.cache.put(key, self.backend_id, name, args, context_id, obs.content, obs.ok, obs.error)
        return obs

    def _rng(self, key: str) -> random.Random:
        return random.Random(int(hashlib.sha256(f"{self.seed}:{key}".encode()).hexdigest()[:16], 16))

    def _produce(self, defn: dict, args: dict, record: QARecord | None, key: str) -> tuple[Observation, bool]:
        """-> (observation, cacheable). Transient failures are not cached: a re-run may succeed."""
        if self.backend == "corpus":
            content = self.corpus.produce(defn, args, record, self._rng(key), self.noise)
            probs = validate_observation(defn, content)
            if probs:
                self._count("invalid")
                name = defn["function"]["name"]
                return _error("unsupported_tool", f"the corpus backend cannot answer {name!r}: {probs[0]}"), True
            err = content["error"]["code"] if "error" in content else None
            return Observation(content, ok=err is None, error=err), True
        return self._produce_llm(defn, args, record)

    def _prompt(self, defn: dict, args: dict, record: QARecord | None) -> str:
        fn = defn["function"]
        context = ""
        idx = self.corpus.index_for(record)
        if idx is not None:  # ground the simulation in the question's own documents
            query = " ".join(str(v) for v in args.values() if isinstance(v, (str, int, float)))
            hits = self.corpus.search(idx, query, 5)
            if hits:
                context = "Relevant documents:\n" + "\n".join(f"- {h['title']}: {h['text']}" for h in hits) + "\n"
        return _SIM_PROMPT.format(name=fn["name"], description=fn.get("description", ""), args=canonical_json(args),
                                  context=context, schema=canonical_json(_success_schema(defn["returns"])))

    def _produce_llm(self, defn: dict, args: dict, record: QARecord | None) -> tuple[Observation, bool]:
        prompt = self._prompt(defn, args, record)
        feedback, last = "", "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                self._count("retries")
                time.sleep(self.backoff_s * (2 ** (attempt - 1)))
            try:
                reply = self.complete(prompt + feedback)
            except TransientError as e:
                self._count("transient_failures")
                last = str(e)
                continue
            except BackendError as e:
                return _error("backend_error", f"the tool backend refused the call ({e})"), False
            except Exception as e:  # a local generate() hook failing: retry like a transient error
                self._count("transient_failures")
                last = f"the model failed ({type(e).__name__})"
                continue
            try:
                content = extract_json_object(reply if isinstance(reply, str) else "")
                probs = validate_observation(defn, content)
            except (ValueError, RecursionError) as e:
                probs = [str(e)]
            if not probs:
                err = content["error"]["code"] if "error" in content else None
                return Observation(content, ok=err is None, error=err), True
            self._count("invalid")
            last = f"invalid observation: {probs[0]}"
            feedback = "\nYour previous reply was invalid: " + "; ".join(probs[:3]) + "\nReply with the corrected JSON object only."
        return _error("tool_unavailable", f"the tool gave no valid observation after {self.retries + 1} attempts ({last[:200]})"), False
