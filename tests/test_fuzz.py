"""Fuzz: >= 10,000 malformed assistant outputs through parse -> validate -> ToolActor. Zero exceptions;
each one ends in a typed parse error or an error observation that is valid against the schemas."""

from __future__ import annotations

import json
import random
import time
from collections import Counter

from mtr_jax.data.records import Paragraph, QARecord
from mtr_jax.tools.schema import ERROR_SCHEMA, validate_observation
from mtr_jax.tools.toolactor import ToolActor
from mtr_jax.tools.toolmaker import template_tools
from mtr_jax.traces.parse import ERROR_CODES, parse_turn

N_PER_KIND = 850
TOOLS = template_tools("comparison") + template_tools("numeric")[2:]  # search, lookup, compare, calculator
DEFS = {t["function"]["name"]: t for t in TOOLS}
RECORD = QARecord(id="f", question="Who founded Acme?", golds=["Jane Roe"], dataset="fuzz",
                  context=[Paragraph("Acme", ["Acme is a company.", "Jane Roe founded Acme in 1901."]),
                           Paragraph("Jane Roe", ["Jane Roe was an engineer."])])


def _call_text(obj) -> str:
    return "<tool_call>\n" + json.dumps(obj, ensure_ascii=False) + "\n</tool_call>"


def _valid_call(rng):
    name = rng.choice(["search", "lookup", "calculator", "compare"])
    args = {"search": {"query": "Acme founder"}, "lookup": {"title": "Acme"}, "calculator": {"expression": "1 + 2"},
            "compare": {"a": "1901", "b": "1950", "relation": "earlier"}}[name]
    return {"name": name, "arguments": dict(args)}


def _junk(rng, n):
    return "".join(rng.choice('abc xyz{}[]":,<>/\\\n\t0123456789') for _ in range(n))


def _truncated(rng):
    full = json.dumps(_valid_call(rng))
    return "<think>t</think>\n<tool_call>\n" + full[: rng.randrange(1, len(full) - 1)] + "\n</tool_call>"


def _unknown_tool(rng):
    name = rng.choice(["weather", "Search", "search ", "ls", "x" * rng.randrange(1, 80), "", "sea-rch", "__init__", "eval"])
    return _call_text({"name": name, "arguments": {"query": "q"}}) if name else _call_text({"name": 7, "arguments": {}})


def _wrong_types(rng):
    bad = rng.choice([3, 2.5, None, True, [], ["q"], {"q": 1}, -1])
    name = rng.choice(["search", "lookup", "calculator", "compare"])
    key = {"search": "query", "lookup": "title", "calculator": "expression", "compare": "a"}[name]
    args = {"search": {"query": "x"}, "lookup": {"title": "x"}, "calculator": {"expression": "1"},
            "compare": {"a": "1", "b": "2", "relation": "earlier"}}[name]
    args[key] = bad
    return _call_text({"name": name, "arguments": args})


def _extra_keys(rng):
    call = _valid_call(rng)
    if rng.random() < 0.5:
        call["arguments"][rng.choice(["k", "top_k", "verbose", "query2"])] = rng.choice([1, "x", None])
    else:
        call[rng.choice(["id", "type", "args", "tool"])] = "x"
    return _call_text(call)


def _huge(rng):
    call = _valid_call(rng)
    key = next(iter(call["arguments"]))
    call["arguments"][key] = "word " * rng.randrange(100, 4000)
    return _call_text(call)


def _bad_enum_or_value(rng):
    return rng.choice([
        _call_text({"name": "compare", "arguments": {"a": "1", "b": "2", "relation": rng.choice(["bigger", "", "EARLIER"])}}),
        _call_text({"name": "compare", "arguments": {"a": "1"}}),
        _call_text({"name": "search", "arguments": {"query": ""}}),
        _call_text({"name": "calculator", "arguments": {"expression": rng.choice(["__import__('os')", "1/0", "9**9**9", "a+b"])}}),
        _call_text({"name": "compare", "arguments": {"a": "someday", "b": "1990", "relation": "later"}}),
    ])


def _tags(rng):
    c = _call_text(_valid_call(rng))
    return rng.choice([
        "<tool_call>" + c + "</tool_call>",
        "<think>" + c + "</think>",
        "<think><think>x</think></think>" + c,
        c + "<answer>Jane Roe</answer>",
        "<answer>a</answer>" * rng.randrange(2, 5),
        "<answer>x" + c,
        c.replace("</tool_call>", ""),
        "</think>" + c,
        "<answer></answer>",
        "<answer><answer>x</answer></answer>",
        c * rng.randrange(9, 12),
        "<think>unclosed " + _junk(rng, 20),
    ])


def _fabricated(rng):
    c = _call_text(_valid_call(rng))
    obs = json.dumps({"results": [{"title": "Acme", "text": "made up"}]})
    return rng.choice([c + f"\n<tool_response>\n{obs}\n</tool_response>", f"<tool_response>{obs}</tool_response>\n<answer>x</answer>",
                       c + "</tool_response>"])


def _bytes(rng):
    good = (_call_text(_valid_call(rng)) if rng.random() < 0.5 else "<answer>Zürich</answer>").encode("utf-8")
    i = rng.randrange(len(good))
    bad = rng.choice([b"\xff", b"\xfe", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80", bytes([rng.randrange(0xF8, 0x100)])])
    return good[:i] + bad + good[i:]


def _structure(rng):
    return rng.choice([
        _call_text(["search", {"query": "x"}]),
        _call_text("search"),
        _call_text({"name": "search"}),
        _call_text({"arguments": {"query": "x"}}),
        _call_text({"name": "search", "arguments": "{not json"}),
        _call_text({"name": "search", "arguments": [1, 2]}),
        _call_text({"name": "search", "arguments": "3"}),
        "<tool_call>" + "{" * rng.randrange(1, 3000) + "</tool_call>",
        "<tool_call>" + "[" * rng.randrange(1000, 5000) + "]" * 10 + "</tool_call>",
        "<tool_call>\n" + _junk(rng, rng.randrange(1, 200)).replace("<", "").replace(">", "") + "\n</tool_call>",
        "<tool_call></tool_call>",
        "<|im_start|>assistant\n" + _call_text(_valid_call(rng)),
        _call_text(_valid_call(rng)) + "<|im_end|><|im_start|>user\nhi",
        _junk(rng, rng.randrange(0, 300)).replace("<", "(").replace(">", ")"),
        "",
        "   \n",
    ])


def _mixed(rng):
    """A valid call next to a malformed one in the same turn: the bad one must still surface."""
    bad = rng.choice([{"name": "nope", "arguments": {}}, {"name": "search", "arguments": {"q": 1}},
                      {"name": "calculator", "arguments": {"expression": "x"}}])
    calls = [_valid_call(rng), bad]
    rng.shuffle(calls)
    return "<think>two</think>\n" + "\n".join(_call_text(c) for c in calls)


KINDS = [_truncated, _unknown_tool, _wrong_types, _extra_keys, _huge, _bad_enum_or_value, _tags, _fabricated, _bytes,
         _structure, _mixed, _extra_keys]


def test_fuzz_parse_validate_actor():
    rng = random.Random(1234)
    actor = ToolActor("corpus", top_k=2)
    outcomes: Counter = Counter()
    n = 0
    internal = 0  # crashes caught by the actor's last line of defence: must be none
    t0 = time.perf_counter()
    for kind in KINDS:
        for _ in range(N_PER_KIND):
            text = kind(rng)
            n += 1
            p = parse_turn(text)
            if p.kind == "error":
                assert p.error in ERROR_CODES and p.message, (kind.__name__, text)
                assert validate_observation(None, p.error_observation()) == []
                outcomes[f"parse:{p.error}"] += 1
                continue
            assert p.kind == "tool_call", (kind.__name__, text[:200], p)  # no malformed output may pass as an answer
            observations = [actor.observe(c, TOOLS, RECORD) for c in p.calls]
            bad = [o for o in observations if not o.ok]
            assert bad, (kind.__name__, text[:300])  # malformed by construction -> an error observation
            for c, o in zip(p.calls, observations):
                assert validate_observation(DEFS.get(c["name"]), o.content) == [], (c, o)
                if not o.ok:
                    assert validate_observation(None, o.content) == [] or DEFS.get(c["name"]) is not None
                    assert set(o.content) == {"error"} and set(o.content["error"]) == {"code", "message"}
            outcomes["actor:" + bad[0].error] += 1
            internal += sum(1 for o in observations if not o.ok and o.error == "internal_error")
    elapsed = time.perf_counter() - t0
    assert n >= 10_000
    assert sum(outcomes.values()) == n
    assert internal == 0, f"{internal} observations were crashes turned into internal_error"
    assert elapsed < 30, elapsed
    # every family of failure was exercised
    for code in ("parse:bad_encoding", "parse:bad_json", "parse:nested_tags", "parse:unbalanced_tags",
                 "parse:fabricated_tool_response", "parse:multiple_answers", "parse:answer_and_call",
                 "parse:call_too_large", "parse:bad_call", "parse:special_token", "parse:no_action",
                 "actor:unknown_tool", "actor:invalid_arguments", "actor:bad_expression", "actor:bad_value"):
        assert outcomes[code] > 0, (code, outcomes)
    assert actor.counters["calls"] >= outcomes["actor:unknown_tool"] + outcomes["actor:invalid_arguments"]
    print(f"fuzz: {n} outputs in {elapsed:.1f}s: {dict(outcomes)}")
    assert ERROR_SCHEMA["required"] == ["error"]
