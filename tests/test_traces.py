"""Trace grammar: chat-template rendering (real Qwen2.5 tokenizer), loss masks, the turn parser, and
the oracle's kept traces re-rendering and re-parsing to the same structure."""

from __future__ import annotations

import json
import pathlib

import pytest

from mtr_jax.data.loaders import load_records
from mtr_jax.tools.autoagent import AutoAgent
from mtr_jax.tools.schema import for_template, validate_observation
from mtr_jax.tools.toolactor import ToolActor
from mtr_jax.tools.toolmaker import ToolMaker, template_tools
from mtr_jax.traces import parse_turn
from mtr_jax.traces.render import (
    SYSTEM_PROMPT,
    assistant_text_to_message,
    assistant_turn_texts,
    build_messages,
    observation_text,
    render_prompt_ids,
    render_trace,
    tool_turn_ids,
)
from qwen_tokenizer import FIXTURES, SHARED_TOKENIZER, qwen25_tokenizer

IM_START, IM_END = 151644, 151645


@pytest.fixture(scope="module")
def tok():
    return qwen25_tokenizer()


def _ids(x):
    return list(x["input_ids"]) if hasattr(x, "keys") else list(x)


def _call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _example_trace():
    tools = template_tools("comparison")
    msgs = build_messages('Who was born earlier, Simone Bolelli or Caroline Wozniacki? "ü" ✓')
    msgs += [
        {"role": "assistant", "content": "<think>I need both birth dates.</think>",
         "tool_calls": [_call("search", query="Simone Bolelli born"), _call("lookup", title="Caroline Wozniacki")]},
        {"role": "tool", "name": "search", "content": observation_text({"results": [{"title": "Simone Bolelli", "text": "Simone Bolelli (born 8 October 1985) is an Italian tennis player."}]})},
        {"role": "tool", "name": "lookup", "content": observation_text({"results": [{"title": "Caroline Wozniacki", "text": "Caroline Wozniacki (born 11 July 1990) is a Danish tennis player."}]})},
        {"role": "assistant", "content": "", "tool_calls": [_call("compare", a="8 October 1985", b="11 July 1990", relation="earlier")]},
        {"role": "tool", "name": "compare", "content": observation_text({"result": True, "a": "8 October 1985", "b": "11 July 1990"})},
        {"role": "assistant", "content": "<think>1985 is earlier.</think>\n<answer>Simone Bolelli</answer>"},
    ]
    return {"id": "ex", "dataset": "hotpotqa", "question": msgs[1]["content"], "golds": ["Simone Bolelli"],
            "tools": tools, "messages": msgs, "answer": "Simone Bolelli"}


# ---------------------------------------------------------------------------------------------
# Rendering against the official template.


def test_prompt_equals_apply_chat_template(tok):
    trace = _example_trace()
    ids = render_prompt_ids(tok, trace["messages"], trace["tools"])
    ref = _ids(tok.apply_chat_template(trace["messages"][:2], tools=for_template(trace["tools"]),
                                       add_generation_prompt=True, tokenize=True))
    assert ids == ref
    assert ids[-3:] == [IM_START, tok.convert_tokens_to_ids("assistant"), tok.encode("\n")[0]]


def test_prompt_text_is_qwen25_tool_format(tok):
    """Independent of the template engine: Qwen2.5's documented tool prompt, written out by hand."""
    tools = template_tools("bridge")
    text = tok.decode(render_prompt_ids(tok, build_messages("Q?"), tools))
    sigs = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in for_template(tools))
    expected = (
        f"<|im_start|>system\n{SYSTEM_PROMPT}\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>{sigs}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text == expected
    assert '"returns"' not in text  # the template gets the OpenAI part only


def test_render_trace_ids_and_mask(tok):
    trace = _example_trace()
    ids, mask = render_trace(tok, trace)
    full = tok.apply_chat_template(trace["messages"], tools=for_template(trace["tools"]), tokenize=False)
    assert ids == tok.encode(full, add_special_tokens=False)
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    # Mask-1 runs are exactly the assistant texts plus their <|im_end|>, in order.
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    assert not cur
    texts = assistant_turn_texts(tok, trace)
    assert len(texts) == 3
    assert runs == [tok.encode(t, add_special_tokens=False) + [IM_END] for t in texts]
    # 0 on headers and on the "\n" after <|im_end|>; every <|im_end|> of an assistant turn is 1.
    for k, i in enumerate(ids):
        if i == IM_START:
            assert mask[k] == 0 and mask[k + 1] == 0 and mask[k + 2] == 0
        if i == IM_END and k + 1 < len(ids):
            assert mask[k + 1] == 0
    assert sum(mask[k] for k, i in enumerate(ids) if i == IM_END) == 3


def test_rollout_concatenation_equals_render(tok):
    """prompt + (model turn + <|im_end|> + tool_turn_ids)* + final turn == render_trace (the sampler
    never re-tokenizes the conversation)."""
    trace = _example_trace()
    msgs = trace["messages"]
    seq = render_prompt_ids(tok, msgs, trace["tools"])
    texts = assistant_turn_texts(tok, trace)
    tool_groups = [[msgs[3]["content"], msgs[4]["content"]], [msgs[6]["content"]], None]
    for text, obs in zip(texts, tool_groups):
        seq += tok.encode(text, add_special_tokens=False) + [IM_END]
        if obs:
            seq += tool_turn_ids(tok, obs)
    ids, _ = render_trace(tok, trace)
    assert ids[: len(seq)] == seq and ids[len(seq):] == tok.encode("\n")


def test_tool_turn_ids_several_observations(tok):
    got = tok.decode(tool_turn_ids(tok, ['{"a": 1}', '{"b": 2}']))
    assert got == ('\n<|im_start|>user\n<tool_response>\n{"a": 1}\n</tool_response>\n<tool_response>\n{"b": 2}'
                   "\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_assistant_text_round_trip(tok):
    trace = _example_trace()
    assistants = [m for m in trace["messages"] if m["role"] == "assistant"]
    for text, msg in zip(assistant_turn_texts(tok, trace), assistants):
        assert assistant_text_to_message(text) == msg
        assert assistant_text_to_message(text + "<|im_end|>") == msg
    # a model's own spacing survives content extraction
    text = '<think>x</think>\n\n<tool_call>\n{"name": "search", "arguments": {"query": "q"}}\n</tool_call>'
    m = assistant_text_to_message(text)
    assert m["content"] == "<think>x</think>\n" and m["tool_calls"] == [_call("search", query="q")]
    assert assistant_text_to_message("garbage") == {"role": "assistant", "content": "garbage"}


def test_render_with_demo_tokenizer():
    """The demo tokenizer has the tags as added tokens; piecewise ids still equal whole-string ids."""
    from mtr_jax.data.demo_tokenizer import train_demo_tokenizer

    trace = _example_trace()
    tok = train_demo_tokenizer([m["content"] for m in trace["messages"]] * 3, vocab_size=400)
    ids, mask = render_trace(tok, trace)
    assert 0 < sum(mask) < len(ids)
    assert render_prompt_ids(tok, trace["messages"], trace["tools"]) == _ids(
        tok.apply_chat_template(trace["messages"][:2], tools=for_template(trace["tools"]), add_generation_prompt=True, tokenize=True))


@pytest.mark.skipif(not SHARED_TOKENIZER.exists(), reason="../shared tokenizer not present (fresh clone)")
def test_matches_real_shared_tokenizer(tok):
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(str(SHARED_TOKENIZER))
    official = json.loads((SHARED_TOKENIZER / "tokenizer_config.json").read_text())["chat_template"]
    ours = pathlib.Path(__file__).resolve().parents[1].joinpath("mtr_jax/assets/qwen2.5_chat_template.jinja").read_text()
    assert ours == official
    trace = _example_trace()
    assert render_trace(real, trace) == render_trace(tok, trace)
    assert render_prompt_ids(real, trace["messages"], trace["tools"]) == _ids(
        real.apply_chat_template(trace["messages"][:2], tools=for_template(trace["tools"]), add_generation_prompt=True, tokenize=True))


# ---------------------------------------------------------------------------------------------
# Parser.

PARSE_CASES = [
    ('<think>a</think>\n<tool_call>\n{"name": "search", "arguments": {"query": "x"}}\n</tool_call><|im_end|>', "tool_call", None),
    ('<tool_call>{"name": "s", "arguments": "{\\"q\\": 1}"}</tool_call>', "tool_call", None),  # OpenAI-style string args
    ("<think>so</think>\n<answer> Rush </answer>", "answer", None),
    (b"<answer>Z\xc3\xbcrich</answer>", "answer", None),
    (b"<answer>\xff\xfe</answer>", "error", "bad_encoding"),
    ("<answer>\ud800</answer>", "error", "bad_encoding"),
    ("<|im_start|>user\n<answer>x</answer>", "error", "special_token"),
    ('<tool_call>{"name": "s", "arguments": {}}</tool_call>\n<tool_response>\n{}\n</tool_response>', "error", "fabricated_tool_response"),
    ("<think><answer>x</answer></think>", "error", "nested_tags"),
    ('<tool_call><tool_call>{"name": "s", "arguments": {}}</tool_call></tool_call>', "error", "nested_tags"),
    ('<tool_call>{"name": "s", "arguments": {"q": "x"', "error", "unbalanced_tags"),
    ("</answer>", "error", "unbalanced_tags"),
    ("<answer>a</answer><answer>b</answer>", "error", "multiple_answers"),
    ('<tool_call>{"name": "s", "arguments": {}}</tool_call><answer>b</answer>', "error", "answer_and_call"),
    ("<answer>  </answer>", "error", "empty_answer"),
    ("".join('<tool_call>{"name": "s", "arguments": {}}</tool_call>' for _ in range(9)), "error", "too_many_calls"),
    ('<tool_call>{"name": "s", "arguments": {"q": "' + "x" * 9000 + '"}}</tool_call>', "error", "call_too_large"),
    ("<tool_call>{name: s}</tool_call>", "error", "bad_json"),
    ("<tool_call>" + "[" * 5000 + "</tool_call>", "error", "bad_json"),
    ('<tool_call>["search", {}]</tool_call>', "error", "bad_call"),
    ('<tool_call>{"name": "s", "arguments": {}, "id": 3}</tool_call>', "error", "bad_call"),
    ('<tool_call>{"arguments": {}}</tool_call>', "error", "bad_call"),
    ('<tool_call>{"name": "s", "arguments": [1]}</tool_call>', "error", "bad_arguments"),
    ("I think the answer is Rush.", "error", "no_action"),
    ("", "error", "no_action"),
    (None, "error", "bad_encoding"),
]


@pytest.mark.parametrize("text,kind,code", PARSE_CASES, ids=[f"{c[1]}-{c[2]}-{i}" for i, c in enumerate(PARSE_CASES)])
def test_parse_turn(text, kind, code):
    p = parse_turn(text)
    assert (p.kind, p.error) == (kind, code), p
    if kind == "error":
        assert p.message and len(p.message) < 400
        assert p.error_observation() == {"error": {"code": code, "message": p.message}}
    if kind == "answer":
        assert p.answer == p.answer.strip() and p.answer


# ---------------------------------------------------------------------------------------------
# The oracle's kept traces on real HotpotQA records.


def test_oracle_traces_rerender_and_reparse(tok, tmp_path):
    records = load_records("hotpotqa", str(FIXTURES / "hotpotqa_dev_original_20.jsonl"))
    assert len(records) == 20
    actor = ToolActor("corpus", cache_path=tmp_path / "cache.sqlite")
    agent = AutoAgent("oracle", actor)
    maker = ToolMaker("template")
    kept = []
    for r in records:
        trace, reason = agent.make_trace(r, maker.make(r))
        assert (trace is None) == bool(reason)
        if trace:
            kept.append(trace)
    assert len(kept) / len(records) >= 0.6, len(kept)
    for trace in kept:
        json.loads(json.dumps(trace))  # plain JSON
        ids, mask = render_trace(tok, trace)
        assert sum(mask) > 0 and len(ids) < 8192
        assistants = [m for m in trace["messages"] if m["role"] == "assistant"]
        texts = assistant_turn_texts(tok, trace)
        assert len(texts) == len(assistants)
        defs = {t["function"]["name"]: t for t in trace["tools"]}
        for k, (text, msg) in enumerate(zip(texts, assistants)):
            assert assistant_text_to_message(text) == msg
            p = parse_turn(text)
            if k < len(texts) - 1:
                assert p.kind == "tool_call", p
                assert [{"type": "function", "function": c} for c in p.calls] == msg["tool_calls"]
            else:
                assert p.kind == "answer" and p.answer == trace["answer"]
        for m in trace["messages"]:
            if m["role"] == "tool":
                assert not validate_observation(defs[m["name"]], json.loads(m["content"]))
