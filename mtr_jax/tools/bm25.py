"""Okapi BM25 ranking for the corpus backend (tools.corpus): our tokenisation (`words`: lower-case
\\w+ runs minus a short English stop list) fed pre-tokenised to `bm25s` (method "lucene", k1=1.5,
b=0.75, idf = ln(1 + (N - n + .5) / (n + .5))). Scores keep the classic (k1 + 1) numerator, which
bm25s (like Lucene >= 8) leaves out: a constant factor, so rankings are bm25s's own.

bm25s is imported on first use: importing it imports JAX and runs one `jax.lax.top_k` (bm25s.selection),
which starts a JAX backend; commands that never build an index do not pay for that.
"""

from __future__ import annotations

import logging
import re

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)
_STOP = frozenset(
    "a an the of in on at to for from by with and or is are was were be been what which who whom whose when "
    "where why how did does do that this these those as it its".split()
)


def words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


def _bm25s():
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets DEBUG on its logger and logs each index
    return bm25s


class BM25:
    """`scores(query)`: one BM25 score per document; `top(query, k)`: the indices of the k best
    documents with a score > 0, ties in document order."""

    def __init__(self, docs: list[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b, self.n = k1, b, len(docs)
        tokens = [words(d) for d in docs]
        self._index = None
        if any(tokens):  # bm25s needs a vocabulary: no docs, or only stop words, score 0 everywhere
            self._index = _bm25s().BM25(k1=k1, b=b, method="lucene", dtype="float64")
            self._index.index(tokens, show_progress=False)

    def _scores(self, query: str) -> np.ndarray:
        if self._index is None:
            return np.zeros(self.n)
        ids = self._index.get_tokens_ids(words(query))  # a repeated query word adds its term again
        if not ids:
            return np.zeros(self.n)
        return self._index.get_scores_from_ids(ids) * (self.k1 + 1)

    def scores(self, query: str) -> list[float]:
        return self._scores(query).tolist()

    def top(self, query: str, k: int) -> list[int]:
        sc = self._scores(query)
        order = np.argsort(-sc, kind="stable")[:k]  # stable: ties in document order (deterministic)
        return [int(i) for i in order if sc[i] > 0]
