"""Parse one assistant turn of the trace grammar. Never raises.

Grammar (Qwen2.5 / Hermes tool calling + our answer tag):

    turn   := [<think> text </think>] (call+ | <answer> text </answer>)
    call   := <tool_call> {"name": str, "arguments": {...}} </tool_call>

Result: kind "tool_call" (calls = [{"name", "arguments"}]), kind "answer" (answer string), or kind
"error" with a typed `error` code (ERROR_CODES) and a `message` that tells the model what to fix.
Which tools exist and whether the arguments fit their schema is checked later, by the ToolActor.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from mtr_jax.tools.schema import error_observation

MAX_CALLS = 8  # calls in one turn
MAX_CALL_CHARS = 8192  # text inside one <tool_call> block
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # a sampler may or may not keep the stop token
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")
_TAG = re.compile(r"<(/?)(think|answer|tool_call)>")
_RESPONSE = re.compile(r"</?tool_response>")

ERROR_CODES = (
    "bad_encoding",
    "special_token",
    "fabricated_tool_response",
    "nested_tags",
    "unbalanced_tags",
    "multiple_answers",
    "answer_and_call",
    "empty_answer",
    "too_many_calls",
    "call_too_large",
    "bad_json",
    "bad_call",
    "bad_arguments",
    "no_action",
    "unparseable",
)
_CALL_HINT = 'Write <tool_call>\n{"name": "<tool name>", "arguments": {...}}\n</tool_call>.'


@dataclass
class ParsedTurn:
    kind: str  # "tool_call" | "answer" | "error"
    text: str = ""  # the decoded turn, stop tokens removed
    calls: list[dict] = field(default_factory=list)
    answer: str | None = None
    think: str = ""
    error: str | None = None  # one of ERROR_CODES when kind == "error"
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.kind != "error"

    def error_observation(self) -> dict:
        """The observation a rollout returns to the model for a malformed turn."""
        return error_observation(self.error or "error", self.message)


def _err(code: str, message: str, text: str = "") -> ParsedTurn:
    return ParsedTurn(kind="error", text=text, error=code, message=message)


def _decode(text) -> tuple[str | None, str]:
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            return bytes(text).decode("utf-8"), ""
        except UnicodeDecodeError as e:
            return None, f"the output is not valid UTF-8 (byte {e.start}); write plain text"
    if not isinstance(text, str):
        return None, f"the output must be text, got {type(text).__name__}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates from a lossy decode
        return None, f"the output contains an invalid character at position {e.start}; write plain text"
    return text, ""


def _strip_stop(text: str) -> str:
    changed = True
    while changed:
        changed = False
        t = text.rstrip()
        for s in STOP_TOKENS:
            if t.endswith(s):
                text, changed = t[: -len(s)], True
    return text


def _parse_call(body: str, i: int) -> tuple[dict | None, ParsedTurn | None]:
    where = f"tool call {i + 1}"
    if len(body) > MAX_CALL_CHARS:
        return None, _err("call_too_large", f"{where} is {len(body)} characters (limit {MAX_CALL_CHARS}); send short arguments")
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:
        msg = str(e).split("\n")[0][:120]
        return None, _err("bad_json", f"{where} is not valid JSON ({msg}). {_CALL_HINT}")
    if not isinstance(obj, dict):
        return None, _err("bad_call", f"{where} must be a JSON object, got {type(obj).__name__}. {_CALL_HINT}")
    extra = sorted(str(k) for k in obj if k not in ("name", "arguments"))
    if extra:
        return None, _err("bad_call", f"{where} has unexpected keys {extra}; only 'name' and 'arguments' are allowed")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None, _err("bad_call", f"{where} needs a string 'name'. {_CALL_HINT}")
    if "arguments" not in obj:
        return None, _err("bad_call", f"{where} needs 'arguments' (a JSON object). {_CALL_HINT}")
    args = obj["arguments"]
    if isinstance(args, str):  # OpenAI style: arguments as a JSON string
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None, _err("bad_json", f"{where}: 'arguments' is a string that is not valid JSON; pass an object")
    if not isinstance(args, dict):
        return None, _err("bad_arguments", f"{where}: 'arguments' must be a JSON object, got {type(args).__name__}")
    return {"name": name, "arguments": args}, None


def parse_turn(text: str | bytes) -> ParsedTurn:
    """One assistant turn -> ParsedTurn. Never raises."""
    try:
        return _parse(text)
    except Exception as e:  # a parser bug must not kill a rollout; report it as a typed error
        return _err("unparseable", f"unparseable output ({type(e).__name__}); " + _CALL_HINT)


def _parse(raw) -> ParsedTurn:
    text, why = _decode(raw)
    if text is None:
        return _err("bad_encoding", why)
    text = _strip_stop(text)
    m = _SPECIAL.search(text)
    if m:
        return _err("special_token", f"the output contains the control token {m.group(0)}; end the turn instead", text)
    if _RESPONSE.search(text):
        return _err(
            "fabricated_tool_response",
            "do not write <tool_response> yourself: call a tool and wait for its response",
            text,
        )
    # Tags must be flat and balanced: <think>, <tool_call> and <answer> blocks, none inside another.
    blocks: list[tuple[str, int, int]] = []  # (tag, content start, content end)
    open_tag, open_end = None, 0
    for m in _TAG.finditer(text):
        closing, tag = m.group(1) == "/", m.group(2)
        if not closing:
            if open_tag is not None:
                return _err("nested_tags", f"<{tag}> inside <{open_tag}>: close </{open_tag}> first", text)
            open_tag, open_end = tag, m.end()
        elif open_tag != tag:
            where = f"inside <{open_tag}>" if open_tag else "without a matching opening tag"
            return _err("unbalanced_tags", f"</{tag}> {where}", text)
        else:
            blocks.append((tag, open_end, m.start()))
            open_tag = None
    if open_tag is not None:
        return _err("unbalanced_tags", f"<{open_tag}> is never closed: end it with </{open_tag}>", text)
    think = "\n".join(text[a:b].strip() for t, a, b in blocks if t == "think")
    answers = [text[a:b].strip() for t, a, b in blocks if t == "answer"]
    bodies = [text[a:b].strip() for t, a, b in blocks if t == "tool_call"]
    if len(answers) > 1:
        return _err("multiple_answers", f"{len(answers)} <answer> blocks: give exactly one final answer", text)
    if answers and bodies:
        return _err("answer_and_call", "a turn either calls tools or answers, not both: answer after the tool responses", text)
    if answers:
        if not answers[0]:
            return _err("empty_answer", "the <answer></answer> block is empty: put the short final answer inside it", text)
        return ParsedTurn(kind="answer", text=text, answer=answers[0], think=think)
    if not bodies:
        return _err(
            "no_action",
            "no tool call and no answer: call a tool with <tool_call>...</tool_call> or answer with <answer>...</answer>",
            text,
        )
    if len(bodies) > MAX_CALLS:
        return _err("too_many_calls", f"{len(bodies)} tool calls in one turn (limit {MAX_CALLS})", text)
    calls = []
    for i, body in enumerate(bodies):
        call, err = _parse_call(body, i)
        if err is not None:
            err.text = text
            return err
        calls.append(call)
    return ParsedTurn(kind="tool_call", text=text, calls=calls, think=think)
