"""The corpus backend of the ToolActor (offline default): BM25 (tools.bm25) over the sentences of the
record's own context, or of a corpus JSONL file of {"title", "text"}; `lookup` by title; the exact
`calculator` and `compare` (tools.exact); seeded noise that swaps retrieved results for irrelevant ones.
`produce` returns the observation content; the actor validates and caches it."""

from __future__ import annotations

import pathlib
import random
import re
import threading
from dataclasses import dataclass

from mtr_jax.data.records import QARecord
from mtr_jax.errors import MtrError
from mtr_jax.tools.bm25 import _WORD, BM25
from mtr_jax.tools.exact import calculate, compare
from mtr_jax.tools.jsonl import read_jsonl
from mtr_jax.tools.schema import error_observation


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
        paras = read_jsonl(path, lambda d: (str(d["title"]), d["sentences"] if "sentences" in d else [str(d["text"])]),
                           key="tools.corpus", expected="a JSON object with 'title' and 'text' (or 'sentences')")
        if not paras:
            raise MtrError(f"{pathlib.Path(path)}: the corpus is empty")
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
