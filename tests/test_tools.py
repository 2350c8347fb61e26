"""Tool schemas, ToolMaker, ToolActor (corpus backend, cache, noise) and the AutoAgent oracle on real
dataset records; `mtr make-tools` / `mtr make-traces` end to end."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from mtr_jax import rewards
from mtr_jax.cli import main as mtr_main
from mtr_jax.data.loaders import load_records
from mtr_jax.data.records import Paragraph, QARecord
from mtr_jax.errors import MtrError
from mtr_jax.tools.autoagent import AutoAgent, keyword_query
from mtr_jax.tools.bm25 import BM25, words
from mtr_jax.tools.exact import calculate, compare
from mtr_jax.tools.schema import (
    ERROR_SCHEMA,
    error_observation,
    validate_arguments,
    validate_observation,
    validate_tool,
    validate_toolset,
)
from mtr_jax.tools.toolactor import ToolActor
from mtr_jax.tools.toolmaker import CALCULATOR, COMPARE, LOOKUP, SEARCH, ToolMaker, classify, template_tools
from qwen_tokenizer import FIXTURES

HOTPOT = FIXTURES / "hotpotqa_dev_original_20.jsonl"
MUSIQUE = FIXTURES / "musique_dev_6.jsonl"
WIKI2 = FIXTURES / "2wiki_dev_6.jsonl"
BAMBOOGLE = FIXTURES / "bamboogle_test_6.jsonl"


@pytest.fixture(scope="module")
def hotpot():
    return load_records("hotpotqa", str(HOTPOT))


# ---------------------------------------------------------------------------------------------
# Schemas.


def _tool(**over):
    d = json.loads(json.dumps(SEARCH))
    for k, v in over.items():
        if k in ("name", "description", "parameters"):
            d["function"][k] = v
        elif v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


@pytest.mark.parametrize(
    "defn,needle",
    [
        (_tool(name="bad name"), "name must match"),
        (_tool(name="x" * 65), "name must match"),
        (_tool(description=""), "description"),
        (_tool(parameters={"type": "object", "properties": {"q": {"type": "string"}}, "required": ["query"]}), "required ['query'] not in"),
        (_tool(parameters={"type": "array"}), '"type": "object"'),
        (_tool(parameters={"type": "object", "properties": {"q": {"type": "strng"}}}), "not a valid JSON Schema"),
        (_tool(returns=None), 'missing "returns"'),
        (_tool(returns={"type": "object", "properties": {"results": {"type": "array"}}, "required": ["results"]}), "accept the error observation"),
        (_tool(extra=1), "unknown top-level keys"),
        (_tool(type="tool"), '"type" must be "function"'),
        ("search", "must be an object"),
    ],
)
def test_validate_tool_problems(defn, needle):
    probs = validate_tool(defn)
    assert any(needle in p for p in probs), probs


def test_template_tools_valid_and_small():
    for qtype in ("bridge", "comparison", "yes-no", "temporal", "numeric"):
        tools = template_tools(qtype)
        assert validate_toolset(tools) == [] and 2 <= len(tools) <= 4
        assert all(len(t["function"]["description"]) <= 80 for t in tools)
    assert any("duplicate tool name 'search'" in p for p in validate_toolset([SEARCH, SEARCH]))
    assert validate_toolset([]) != []


def test_validate_arguments_and_observation():
    assert validate_arguments(SEARCH, {"query": "x"}) == []
    probs = validate_arguments(SEARCH, {"query": 3, "k": 1})
    assert any("'query'" in p and "not of type 'string'" in p for p in probs)
    assert any("'k' was unexpected" in p and "allowed keys: ['query']" in p for p in probs)
    assert any("'query' is a required property" in p for p in validate_arguments(SEARCH, {}))
    assert "must be a JSON object" in validate_arguments(SEARCH, ["q"])[0]
    assert "too large" in validate_arguments(SEARCH, {"query": "x" * 10000})[0]
    assert any("enum" in p or "is not one of" in p for p in validate_arguments(COMPARE, {"a": "1", "b": "2", "relation": "bigger"}))
    assert validate_observation(SEARCH, {"results": [{"title": "t", "text": "x"}]}) == []
    assert validate_observation(SEARCH, error_observation("c", "m")) == []
    assert validate_observation(None, error_observation("c", "m")) == []
    probs = validate_observation(SEARCH, {"results": [{"title": 1}]})
    assert any("results.0" in p for p in probs) and not any("any of the given schemas" in p for p in probs)
    assert validate_observation(SEARCH, "text")[0].startswith("an observation must be a JSON object")


# ---------------------------------------------------------------------------------------------
# ToolMaker.


@pytest.mark.parametrize(
    "q,t",
    [
        ("Are Sutera and Rhodotypos both types of shrub?", "yes-no"),
        ("Is Paris the capital of France?", "yes-no"),
        ("Who was born earlier, Simone Bolelli or Caroline Wozniacki?", "comparison"),
        ("Which film came out first, Blind Shaft or The Mask Of Fu Manchu?", "comparison"),
        ("When did the president who set the precedent of a two term limit enter office?", "temporal"),
        ("In what year did the Danish plant ecologist die?", "temporal"),
        ("How many people died in the second most powerful earthquake ever recorded?", "numeric"),
        ("Which Canadian rock band released a song called Counterparts?", "bridge"),
        ("What is the place of birth of the director of film The Zone?", "bridge"),
    ],
)
def test_classify(q, t):
    assert classify(q) == t


def test_classify_agrees_with_hotpot_labels(hotpot):
    """HotpotQA's own labels: yes/no golds are comparison questions we call yes-no; bridge stays bridge-like."""
    for r in hotpot:
        c = classify(r.question)
        if rewards.normalize_answer(r.answer) in ("yes", "no"):
            assert c == "yes-no", r.question
        if r.type == "comparison" and c not in ("yes-no",):
            assert c in ("comparison", "temporal", "numeric"), r.question


def test_toolmaker_template_over_real_records(hotpot):
    recs = hotpot + load_records("musique", str(MUSIQUE)) + load_records("2wikimultihopqa", str(WIKI2))
    maker = ToolMaker("template")
    for r in recs:
        tools = maker.make(r)
        assert validate_toolset(tools) == []
        assert {"search", "lookup"} <= {t["function"]["name"] for t in tools}
    assert maker.stats.dropped == 0 and maker.stats.generated == maker.stats.valid > 0


def test_toolmaker_llm_validates_repairs_retries_and_drops():
    good = {"type": "function", "function": {"name": "birth_date", "description": "Birth date of a person.",
            "parameters": {"type": "object", "properties": {"person": {"type": "string"}}, "required": ["person"]}},
            "returns": {"anyOf": [{"type": "object", "properties": {"date": {"type": "string"}}, "required": ["date"]}, ERROR_SCHEMA]}}
    repairable = {"name": "film director!", "description": "Director of a film.",  # bare function, bad name
                  "parameters": {"type": "object", "properties": {"film": {"type": "string"}}, "required": ["film", "year"]},
                  "returns": {"type": "object", "properties": {"director": {"type": "string"}}}}
    broken = {"type": "function", "function": {"name": "x", "description": "d", "parameters": {"type": "object",
              "properties": {"a": {"type": "nope"}}}}, "returns": {"type": "object"}}
    prompts = []
    replies = iter([
        "Here you go:\n```json\n" + json.dumps([good, repairable, broken]) + "\n```",
        "not json at all",
        json.dumps([broken]),
    ])

    def generate(prompt):
        prompts.append(prompt)
        return next(replies)

    maker = ToolMaker("llm", generate=generate, retries=2)
    rec = QARecord(id="1", question="Who directed the film whose director was born first?", golds=["x"], dataset="t")
    tools = maker.make(rec)
    names = [t["function"]["name"] for t in tools]
    assert names == ["search", "lookup", "birth_date", "film_director"]
    assert validate_toolset(tools) == []
    fd = tools[-1]
    assert fd["function"]["parameters"]["required"] == ["film"]
    s = maker.stats.as_dict()
    # proposals: good (valid), repairable (repaired), broken twice (dropped); + one unreadable reply (dropped)
    assert (s["generated"], s["valid"], s["repaired"], s["dropped"]) == (4, 1, 1, 3)
    assert "unreadable reply" in s["drop_reasons"] and "tool 'x'" in s["drop_reasons"]
    assert len(prompts) == 3
    assert "not a valid JSON Schema" in prompts[1]  # the validator's words go back to the model
    assert "not a JSON list" in prompts[2]


# ---------------------------------------------------------------------------------------------
# Ranking and exact utilities.


def _bm25_numpy(docs, query, k1=1.5, b=0.75):
    """Independent vectorised Okapi BM25 (Lucene idf)."""
    toks = [words(d) for d in docs]
    vocab = {w: j for j, w in enumerate(sorted({w for t in toks for w in t}))}
    tf = np.zeros((len(docs), len(vocab)))
    for i, t in enumerate(toks):
        for w in t:
            tf[i, vocab[w]] += 1
    dl = tf.sum(1)
    n = len(docs)
    dfreq = (tf > 0).sum(0)
    idf = np.log(1 + (n - dfreq + 0.5) / (dfreq + 0.5))
    q = np.zeros(len(vocab))
    for w in words(query):
        if w in vocab:
            q[vocab[w]] += 1
    sat = tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl[:, None] / dl.mean()))
    return (sat * idf * q).sum(1)


def test_bm25_matches_numpy_oracle(hotpot):
    docs = [" ".join(p.sentences) for r in hotpot[:5] for p in r.context]
    bm = BM25(docs)
    for r in hotpot[:5]:
        np.testing.assert_allclose(bm.scores(r.question), _bm25_numpy(docs, r.question), rtol=1e-9, atol=1e-12)
    toy = BM25(["the cat sat", "a dog barked loudly", "cat and dog"])
    assert toy.top("dog", 3) == [1, 2] or toy.top("dog", 3) == [2, 1]
    assert toy.top("cat dog", 1) == [2] and toy.top("zebra", 3) == []


def test_bm25_on_bm25s_by_hand(capsys, caplog):
    """The bm25s-backed ranker gives the classic numbers: N=3, avg length 2, idf(cat) = ln(1 + 1.5/2.5);
    "cat cat dog" (f=2, length 3): 2 * 2.5 / (2 + 1.5 * (0.25 + 0.75 * 3/2)) = 16/13 times idf."""
    caplog.set_level(logging.DEBUG)
    bm = BM25(["Cat sat", "the dog", "cat cat dog"])
    np.testing.assert_allclose(bm.scores("cat"), [math.log(1.6), 0.0, 16 / 13 * math.log(1.6)], rtol=1e-12)
    np.testing.assert_allclose(bm.scores("cat cat"), [2 * math.log(1.6), 0.0, 32 / 13 * math.log(1.6)], rtol=1e-12)
    assert bm.top("cat", 3) == [2, 0] and bm.top("cat", 1) == [2] and bm.top("the of", 3) == []
    assert bm.scores("") == [0.0, 0.0, 0.0] and bm.scores("zebra") == [0.0, 0.0, 0.0]
    assert BM25(["red x", "blue x", "x"]).top("x", 3) == [2, 0, 1]  # equal scores: document order
    np.testing.assert_allclose(BM25(["cat"]).scores("cat"), [math.log(4 / 3)], rtol=1e-12)  # one document
    assert BM25([]).scores("cat") == [] and BM25([]).top("cat", 3) == []
    assert BM25(["the of", ""]).scores("the of") == [0.0, 0.0]  # no vocabulary at all
    out = capsys.readouterr()
    assert out.out == out.err == ""  # no progress bars
    assert not [r for r in caplog.records if r.name.startswith("bm25s")]  # bm25s logs at DEBUG by default


def test_calculator_and_compare():
    assert calculate("2019 - 1987") == 32 and calculate("(3 + 4) * 2 / 7") == 2 and calculate("1,000 * 2") == 2000
    for bad in ("__import__('os')", "2 ** 99999", "1/0", "x + 1", ""):
        with pytest.raises(ValueError):
            calculate(bad)
    assert compare("2 November 1932", "July 23, 1968", "earlier") is True
    assert compare("6 July 1958", "22 February 1981", "later") is False
    assert compare("12 May 1930", "12 May 1930", "equal") is True
    assert compare("1,200", "999", "greater") is True
    with pytest.raises(ValueError):
        compare("yesterday", "1990", "earlier")


# ---------------------------------------------------------------------------------------------
# ToolActor, corpus backend.


def test_corpus_search_lookup_and_errors(hotpot):
    rec = hotpot[0]  # Rush / Counterparts
    tools = template_tools("bridge") + [CALCULATOR, COMPARE]
    actor = ToolActor("corpus", top_k=3)
    obs = actor.observe({"name": "search", "arguments": {"query": "song Counterparts Canadian rock band"}}, tools, rec)
    assert obs.ok and len(obs.content["results"]) == 3
    assert obs.content["results"][0]["title"] == "Nobody's Hero"
    assert not validate_observation(SEARCH, obs.content)
    look = actor.observe({"name": "lookup", "arguments": {"title": "neil peart"}}, tools, rec)
    assert look.ok and look.content["results"][0]["title"] == "Neil Peart" and "Rush" in look.content["results"][0]["text"]
    calc = actor.observe({"name": "calculator", "arguments": {"expression": "1993 - 1952"}}, tools, rec)
    assert calc.content == {"value": 41.0}
    for call, code in [
        ({"name": "weather", "arguments": {}}, "unknown_tool"),
        ({"name": "search", "arguments": {"q": "x"}}, "invalid_arguments"),
        ({"name": "search", "arguments": {"query": 7}}, "invalid_arguments"),
        ({"name": "calculator", "arguments": {"expression": "import os"}}, "bad_expression"),
        ({"name": "compare", "arguments": {"a": "soon", "b": "1990", "relation": "earlier"}}, "bad_value"),
        ("search", "bad_call"),
    ]:
        o = actor.observe(call, tools, rec)
        assert not o.ok and o.error == code, (call, o)
        name = call["name"] if isinstance(call, dict) else ""
        defn = next((t for t in tools if t["function"]["name"] == name), None)
        assert not validate_observation(defn, o.content)
    assert "available tools: calculator, compare, lookup, search" in actor.observe({"name": "w", "arguments": {}}, tools, rec).content["error"]["message"]
    c = actor.counters
    assert c["calls"] == 10 and c["errors"] == 7 and c["unknown_tool"] == 2 and c["bad_arguments"] == 2


def test_corpus_file_for_records_without_context(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in [
        {"title": "Citibank", "text": "Citibank was founded in 1812. It is a bank."},
        {"title": "James Madison", "text": "James Madison was president of the United States from 1809 to 1817."},
    ]) + "\n")
    rec = load_records("bamboogle", str(BAMBOOGLE))[0]
    actor = ToolActor("corpus", corpus_path=str(corpus), top_k=2)
    obs = actor.observe({"name": "search", "arguments": {"query": "president United States Citibank founded"}}, [SEARCH], rec)
    assert obs.ok and {r["title"] for r in obs.content["results"]} == {"Citibank", "James Madison"}
    no_corpus = ToolActor("corpus").observe({"name": "search", "arguments": {"query": "x"}}, [SEARCH], rec)
    assert no_corpus.error == "no_corpus"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "a"}\n')
    from mtr_jax.errors import MtrError

    with pytest.raises(MtrError, match="bad.jsonl line 1"):
        ToolActor("corpus", corpus_path=str(bad))


def test_noise_injection_share_and_determinism(hotpot):
    tools = template_tools("bridge")
    queries = [(r, w) for r in hotpot for w in r.question.split()[:12] if len(w) > 3]
    clean = ToolActor("corpus", top_k=3)
    noisy = ToolActor("corpus", top_k=3, noise=0.3, seed=1)
    noisy2 = ToolActor("corpus", top_k=3, noise=0.3, seed=1)
    other = ToolActor("corpus", top_k=3, noise=0.3, seed=2)
    replaced = total = 0
    diff_seed = False
    for r, w in queries:
        call = {"name": "search", "arguments": {"query": w}}
        a, b = clean.observe(call, tools, r).content["results"], noisy.observe(call, tools, r).content["results"]
        assert b == noisy2.observe(call, tools, r).content["results"]  # seeded: reproducible
        diff_seed |= b != other.observe(call, tools, r).content["results"]
        clean_titles = {x["title"] for x in a}
        for x, y in zip(a, b):
            total += 1
            if x != y:
                replaced += 1
                assert y["title"] not in clean_titles  # injected results are irrelevant pages
    share = replaced / total
    assert total > 300 and abs(share - 0.3) < 0.06, (share, total)
    assert diff_seed


def test_cache_hits_and_determinism(hotpot, tmp_path):
    path = tmp_path / "c.sqlite"
    tools = template_tools("bridge")
    call = {"name": "search", "arguments": {"query": "Neil Peart drummer"}}
    a = ToolActor("corpus", cache_path=path, noise=0.5)
    first = a.observe(call, tools, hotpot[0])
    again = a.observe(call, tools, hotpot[0])
    assert not first.cached and again.cached and again.content == first.content and a.counters["cache_hits"] == 1
    b = ToolActor("corpus", cache_path=path, noise=0.5)  # a re-run reads the same observation back
    hit = b.observe({"name": "search", "arguments": {"query": "Neil Peart drummer"}}, tools, hotpot[0])
    assert hit.cached and hit.content == first.content
    miss = b.observe(call, tools, hotpot[1])  # another context id is another key
    assert not miss.cached


_WRITER = """
import sys, time
from mtr_jax.tools.cache import ObservationCache
c = ObservationCache(sys.argv[1])
i = 0
while True:
    c.put(f"k{i}", "b", "t", {"i": i, "pad": "x" * 2000}, "ctx", {"results": [{"title": "t", "text": "y" * 2000}]}, True, None)
    i += 1
    if i == 50:
        print("ready", flush=True)
"""


def test_cache_survives_kill(tmp_path):
    path = tmp_path / "crash.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    db = sqlite3.connect(str(path))
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = db.execute("SELECT key, content FROM observations").fetchall()
    assert len(rows) >= 50
    for _, content in rows:
        json.loads(content)
    from mtr_jax.tools.cache import ObservationCache

    assert len(ObservationCache(path)) == len(rows)


# ---------------------------------------------------------------------------------------------
# AutoAgent.


def _grounded_in_tools(trace):
    obs = [m["content"] for m in trace["messages"] if m["role"] == "tool"]
    a = trace["answer"]
    return rewards.normalize_answer(a) in ("yes", "no") or rewards.grounded(a, obs, threshold=1.0) == 1.0


@pytest.mark.parametrize("name,path,min_kept", [("musique", MUSIQUE, 4), ("2wikimultihopqa", WIKI2, 4), ("hotpotqa", HOTPOT, 12)])
def test_oracle_real_datasets(name, path, min_kept):
    recs = load_records(name, str(path))
    actor = ToolActor("corpus")
    agent = AutoAgent("oracle", actor)
    maker = ToolMaker("template")
    kept = 0
    for r in recs:
        trace, reason = agent.make_trace(r, maker.make(r))
        if trace is None:
            assert reason
            continue
        kept += 1
        assert rewards.exact_match(trace["answer"], r.golds) == 1.0
        assert _grounded_in_tools(trace), trace["answer"]
        assert trace["messages"][0]["role"] == "system" and trace["messages"][1] == {"role": "user", "content": r.question}
        assert set(trace) == {"id", "dataset", "question", "golds", "tools", "messages", "answer"}
        if name == "musique":  # one search per decomposition step at least
            assert sum(m["role"] == "tool" for m in trace["messages"]) >= len(r.decomposition)
    assert kept >= min_kept, (name, kept)
    assert actor.counters["calls"] > 0


def test_oracle_rejects_ungrounded_and_wrong():
    rec = QARecord(id="u", question="Who founded Acme?", golds=["Jane Roe"], dataset="hotpotqa",
                   context=[Paragraph("Acme", ["Acme is a company.", "It makes anvils."])], supporting=[("Acme", 0)])
    agent = AutoAgent("oracle", ToolActor("corpus"))
    assert agent.make_trace(rec, template_tools("bridge")) == (None, "ungrounded")
    assert agent.make_trace(rec, [CALCULATOR]) == (None, "no_search_tools")
    rec = QARecord(id="u2", question=rec.question, golds=rec.golds, dataset="hotpotqa",  # indexes are per context id
                   context=rec.context + [Paragraph("Jane Roe", ["Jane Roe founded Acme in 1901."])],
                   supporting=[("Acme", 0), ("Jane Roe", 0)])
    trace, reason = agent.make_trace(rec, template_tools("bridge"))
    assert reason == "" and trace["answer"] == "Jane Roe"
    assert "Jane Roe founded Acme" in trace["messages"][-1]["content"]  # the final think cites the evidence


def test_oracle_keyword_queries(hotpot):
    """keyword_query_rate: that share of records (fixed per id) gets the question's keywords as its
    first search, the rest the whole question; the traces stay correct and grounded."""
    assert keyword_query("Where was the director of Mukvonpo born?") == "director Mukvonpo born"
    assert keyword_query("In which country is the city where Tavyth Vyth was born?") == "country city Tavyth Vyth born"
    assert keyword_query("Who is it?") == "it" and keyword_query("Where was it?") == "it"
    assert keyword_query("Where is?") == "Where is?"  # nothing left: the question itself
    maker = ToolMaker("template")

    def first_queries(rate):
        agent = AutoAgent("oracle", ToolActor("corpus"), keyword_query_rate=rate)
        out = {}
        for r in hotpot:
            trace, _ = agent.make_trace(r, maker.make(r))
            if trace is not None:
                assert rewards.exact_match(trace["answer"], r.golds) == 1.0 and _grounded_in_tools(trace)
                q = " ".join(r.question.split())  # the oracle's queries are whitespace-normalised
                out[r.id] = (q, trace["messages"][2]["tool_calls"][0]["function"]["arguments"]["query"])
        return out

    none, half, every = first_queries(0.0), first_queries(0.5), first_queries(1.0)
    assert none and all(q == query for q, query in none.values())
    assert every and all(query == keyword_query(q) != q for q, query in every.values())
    n_kw = sum(query != q for q, query in half.values())
    assert 0 < n_kw < len(half), (n_kw, len(half))
    assert first_queries(0.5) == half  # the same records every run
    with pytest.raises(MtrError, match="keyword_query_rate"):
        AutoAgent("oracle", ToolActor("corpus"), keyword_query_rate=1.5)


def test_oracle_brief_think(hotpot):
    """brief_think_rate: that share of records (stratified per template, an order of its own) gets
    BRIEF_THINK as its first <think>, the rest SEARCH_THINK; queries and answers do not change."""
    from mtr_jax.tools.autoagent import BRIEF_THINK, SEARCH_THINK, keyword_ids

    maker = ToolMaker("template")

    def first_turns(rate, kw=0.0):
        agent = AutoAgent("oracle", ToolActor("corpus"), brief_think_rate=rate, keyword_query_rate=kw)
        out = {}
        for r, (trace, _) in zip(hotpot, agent.make_traces(hotpot, [maker.make(r) for r in hotpot])):
            if trace is not None:
                assert rewards.exact_match(trace["answer"], r.golds) == 1.0 and _grounded_in_tools(trace)
                m = trace["messages"][2]
                out[r.id] = (m["content"], m["tool_calls"][0]["function"]["arguments"]["query"], len(trace["messages"]))
        return out

    none, half, every = first_turns(0.0), first_turns(0.5), first_turns(1.0)
    assert len(none) > 4 and all(c == f"<think>{SEARCH_THINK}</think>" for c, _, _ in none.values())
    assert all(c == f"<think>{BRIEF_THINK}</think>" for c, _, _ in every.values())
    assert {i: v[1:] for i, v in every.items()} == {i: v[1:] for i, v in none.items()}  # same calls, same turns
    brief = {i for i, (c, _, _) in half.items() if BRIEF_THINK in c}
    assert 0 < len(brief) < len(half) and brief == keyword_ids(hotpot, 0.5, salt="brief/") & set(half)
    assert first_turns(0.5) == half  # the same records every run
    assert keyword_ids(hotpot, 0.5, salt="brief/") != keyword_ids(hotpot, 0.5)  # not the keyword records
    with pytest.raises(MtrError, match="brief_think_rate"):
        AutoAgent("oracle", ToolActor("corpus"), brief_think_rate=-0.1)


def test_keyword_ids_stratified_per_template():
    """keyword_ids: within each question template the share is floor(rate * n + u), u in [0, 1), so
    every template with enough records gets both query styles; the choice is fixed per batch."""
    from mtr_jax.tools.autoagent import keyword_ids, question_template

    assert question_template("Where was the director of Quiet Harbor born?") == "where was the director of born"
    recs = [QARecord(id=f"{k}{i}", question=q.format(f"Name{i} Other"), golds=["x"], dataset="d")
            for k, q, n in (("a", "Where was the director of {} born?", 24), ("b", "Where was the founder of {} born?", 19),
                            ("c", "In which country is the city where {} was born?", 21)) for i in range(n)]
    for rate in (0.0, 0.25, 0.3, 0.4, 1.0):
        ids = keyword_ids(recs, rate)
        for k, n in (("a", 24), ("b", 19), ("c", 21)):
            got = sum(i.startswith(k) for i in ids)
            assert int(rate * n) <= got <= int(rate * n) + 1, (rate, k, got)
        assert keyword_ids(list(reversed(recs)), rate) == ids  # order of the batch does not matter
    # one record per template: a fixed per-record draw with the expected share
    singles = [QARecord(id=f"s{i}", question=f"Question {i} number {i}?", golds=["x"], dataset="d") for i in range(400)]
    assert 80 < len(keyword_ids(singles, 0.3)) < 160


def test_llm_teacher_backend():
    rec = QARecord(id="t", question="Who founded Acme?", golds=["Jane Roe"], dataset="x",
                   context=[Paragraph("Acme", ["Acme was founded by Jane Roe."])])
    turns = iter([
        '<think>Search.</think>\n<tool_call>\n{"name": "search", "arguments": {"query": "Acme founder"}}\n</tool_call>',
        "<think>Found it.</think>\n<answer>Jane Roe</answer>",
    ])
    seen = []

    def complete(prompt):
        seen.append(prompt)
        return next(turns)

    agent = AutoAgent("llm", ToolActor("corpus"), complete=complete)
    trace, reason = agent.make_trace(rec, template_tools("bridge"))
    assert reason == "" and trace["answer"] == "Jane Roe"
    assert "Acme was founded by Jane Roe" in seen[1]  # the observation reached the teacher
    assert [m["role"] for m in trace["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    bad = AutoAgent("llm", ToolActor("corpus"), complete=lambda p: "<answer>a</answer><answer>b</answer>")
    assert bad.make_trace(rec, template_tools("bridge")) == (None, "teacher_format:multiple_answers")
    wrong = AutoAgent("llm", ToolActor("corpus"), complete=lambda p: "<answer>John Doe</answer>")
    assert wrong.make_trace(rec, template_tools("bridge")) == (None, "wrong_answer")


# ---------------------------------------------------------------------------------------------
# CLI.


def test_cli_make_tools_and_traces(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "data:\n  datasets:\n"
        f"    - {{name: hotpotqa, path: '{HOTPOT}'}}\n"
        f"    - {{name: musique, path: '{MUSIQUE}'}}\n"
        f"run:\n  out_dir: '{tmp_path / 'run'}'\n"
    )
    tools_out = tmp_path / "tools.jsonl"
    assert mtr_main(["make-tools", "--config", str(cfg), "--out", str(tools_out), "--limit", "5"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["records"] == 10 and summary["dropped"] == 0 and summary["valid"] == summary["generated"] > 0
    lines = [json.loads(x) for x in tools_out.read_text().splitlines()]
    assert len(lines) == 10 and all(validate_toolset(x["tools"]) == [] for x in lines)
    traces_out = tmp_path / "traces.jsonl"
    rc = mtr_main(["make-traces", "--config", str(cfg), "--out", str(traces_out), "--limit", "5", f"data.tools={tools_out}"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kept = [json.loads(x) for x in traces_out.read_text().splitlines()]
    assert summary["kept"] == len(kept) >= 6 and summary["kept"] + summary["rejected"] == 10
    assert sum(summary["reasons"].values()) == summary["rejected"]
    assert (tmp_path / "run" / "tool_cache.sqlite").exists()
    # Second run: every observation comes from the cache and the output is identical.
    first = traces_out.read_text()
    assert mtr_main(["make-traces", "--config", str(cfg), "--out", str(traces_out), "--limit", "5", f"data.tools={tools_out}"]) == 0
    summary2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert traces_out.read_text() == first
    assert summary2["actor"]["cache_hits"] == summary2["actor"]["calls"] - summary2["actor"]["unknown_tool"] - summary2["actor"]["bad_arguments"]


def test_cli_bad_input_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  datasets: []\n")
    assert mtr_main(["make-tools", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.datasets" in err and len(err.splitlines()) == 1
    bad_tools = tmp_path / "t.jsonl"
    bad_tools.write_text("{not json\n")
    cfg.write_text(f"data:\n  datasets: [{{name: hotpotqa, path: '{HOTPOT}'}}]\n  tools: '{bad_tools}'\n")
    assert mtr_main(["make-traces", "--config", str(cfg), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "t.jsonl line 1" in capsys.readouterr().err
    cfg.write_text(f"data:\n  datasets: [{{name: hotpotqa, path: '{HOTPOT}'}}]\ntools:\n  toolactor: http\n")
    assert mtr_main(["make-traces", "--config", str(cfg), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "tools.base_url" in capsys.readouterr().err
