"""tools.json_extract (the JSON in a model reply: strict first, json_repair for slips) and tools.jsonl
(the strict JSONL reader behind tools.corpus and data.tools)."""

import json

import pytest

from mtr_jax.data.records import QARecord
from mtr_jax.errors import MtrError
from mtr_jax.tools.json_extract import extract_json, extract_json_object
from mtr_jax.tools.jsonl import read_jsonl
from mtr_jax.tools.schema import ERROR_SCHEMA
from mtr_jax.tools.toolmaker import ToolMaker

OBS = {"results": [{"title": "Acme", "text": "Acme was founded by Jane Roe."}]}


@pytest.mark.parametrize("reply", [
    json.dumps(OBS),
    "Sure:\n```json\n" + json.dumps(OBS, indent=2) + "\n```\nAnything else?",
    "I will use {query} here: " + json.dumps(OBS),  # braces in prose before the value: strict, not repaired
])
def test_strict_values_are_not_repaired(reply):
    assert extract_json(reply, "{") == (OBS, False) and extract_json(reply) == (OBS, False)


@pytest.mark.parametrize("reply", [
    '{"results": [{"title": "Acme", "text": "Acme was founded by Jane Roe."},]}',  # trailing comma
    "{'results': [{'title': 'Acme', 'text': 'Acme was founded by Jane Roe.'}]}",  # single quotes
    'Here: {"results": [{"title": "Acme", "text": "Acme was founded by Jane Roe."}',  # cut off: unclosed
    '```json\n{"results": [{"title": "Acme", "text": "Acme was founded by Jane Roe.",}]\n```',
])
def test_slips_are_repaired_whole(reply):
    """Strict parsing alone would return the inner {"title", "text"} object (or nothing)."""
    assert extract_json(reply, "{") == (OBS, True)
    assert extract_json_object(reply) == OBS


@pytest.mark.parametrize("reply", ["", "no JSON at all", "I am not sure, maybe Jane?", "hello {", "Use {braces} here", "}{"])
def test_garbage_raises(reply):
    with pytest.raises(ValueError, match="no JSON object in the reply"):
        extract_json_object(reply)
    with pytest.raises(ValueError, match="no JSON value in the reply"):
        extract_json(reply)


def test_lists_and_objects():
    assert extract_json('tools: [{"a": 1}, {"b": 2},]') == ([{"a": 1}, {"b": 2}], True)
    assert extract_json('[1, 2]') == ([1, 2], False)
    assert extract_json_object('[1, {"a": 1}]') == {"a": 1}  # the actor wants an object
    one = {"type": "function", "function": {"name": "f", "parameters": {"required": ["x"]}}}
    assert extract_json("Here is one tool: " + json.dumps(one)) == (one, False)  # not its "required" list


def test_toolmaker_reads_a_single_tool_and_counts_json_repairs():
    good = {"type": "function", "function": {"name": "birth_date", "description": "Birth date of a person.",
            "parameters": {"type": "object", "properties": {"person": {"type": "string"}}, "required": ["person"]}},
            "returns": {"anyOf": [{"type": "object", "properties": {"date": {"type": "string"}}, "required": ["date"]}, ERROR_SCHEMA]}}
    rec = QARecord(id="1", question="Who was born first?", golds=["x"], dataset="t")
    maker = ToolMaker("llm", generate=lambda p: "One tool:\n" + json.dumps(good), retries=0)
    assert [t["function"]["name"] for t in maker.make(rec)][-1] == "birth_date"
    assert maker.stats.as_dict()["json_repaired"] == 0 and maker.stats.valid == 1
    maker = ToolMaker("llm", generate=lambda p: json.dumps([good])[:-1] + ",]", retries=0)  # trailing comma
    assert [t["function"]["name"] for t in maker.make(rec)][-1] == "birth_date"
    assert maker.stats.as_dict()["json_repaired"] == 1 and maker.stats.dropped == 0


def test_read_jsonl(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"k": 1}\n\n  \n{"k": 2}\n')
    assert read_jsonl(p, lambda d: d["k"], key="x.file", expected="{k}") == [1, 2]
    with pytest.raises(MtrError, match=r"^x\.file: file not found: .*nope\.jsonl \(make it\)$"):
        read_jsonl(tmp_path / "nope.jsonl", lambda d: d, key="x.file", expected="{k}", hint=" (make it)")
    p.write_text('{"k": 1}\n{"j": 1}\n')
    with pytest.raises(MtrError, match=r"x\.jsonl line 2: expected \{k\}$"):
        read_jsonl(p, lambda d: d["k"], key="x.file", expected="{k}")
    p.write_text('{"k": 1}\n{not json\n')
    with pytest.raises(MtrError, match="x.jsonl line 2"):
        read_jsonl(p, lambda d: d["k"], key="x.file", expected="{k}")
