"""Render traces through the tokenizer's chat template (Qwen2.5 native tool format) and build loss masks.

The chat template is the single source of truth for the text. Token ids are produced segment by
segment, split at <|im_start|> / <|im_end|> and after each "<|im_start|>assistant\\n" header, so that
the ids of an assistant turn are exactly what a sampler emits after the generation prompt; every
render checks they equal tokenizing the whole template string at once.

Loss mask = 1 exactly on what the model emits: assistant content (think, <tool_call> text, answer)
and its closing <|im_end|> (the stop token is trained). 0 on system/user/tool turns, on the
"<|im_start|>assistant\\n" headers and on the "\\n" after <|im_end|>.

Tools reach the template without `returns` (see `tools.schema.for_template`).
"""

from __future__ import annotations

import json
import re

from mtr_jax.errors import MtrError
from mtr_jax.tools.schema import for_template
from mtr_jax.traces.parse import STOP_TOKENS, parse_turn

SYSTEM_PROMPT = (
    "Answer the question. Think step by step inside <think></think>, call tools to find facts, "
    "and give the short final answer inside <answer></answer>."
)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
_SPLIT = re.compile(r"(<\|im_start\|>|<\|im_end\|>)")
_HEADER = "assistant\n"


def build_messages(question: str, system: str = SYSTEM_PROMPT) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def observation_text(obs: dict) -> str:
    """The one spelling of an observation inside a tool message."""
    return json.dumps(obs, ensure_ascii=False)


def _as_list(ids) -> list[int]:
    if hasattr(ids, "keys") and "input_ids" in ids:  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def chat_text(tokenizer, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=for_template(tools) if tools else None, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def _prompt_messages(messages: list[dict]) -> list[dict]:
    for i, m in enumerate(messages):
        if m.get("role") == "assistant":
            return messages[:i]
    return list(messages)


def render_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """Ids of the messages before the first assistant turn, plus the generation prompt."""
    text = chat_text(tokenizer, _prompt_messages(messages), tools, True)
    ids, _ = _segment_ids(tokenizer, text)
    return ids


def _segment_ids(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Tokenize `text` piecewise (see module doc) -> (ids, loss mask)."""
    pieces: list[tuple[str, int]] = []  # (text, mask)
    after_start, in_assistant = False, False
    for part in _SPLIT.split(text):
        if not part:
            continue
        if part == IM_START:
            pieces.append((part, 0))
            after_start = True
            continue
        if part == IM_END:
            pieces.append((part, 1 if in_assistant else 0))
            in_assistant, after_start = False, False
            continue
        if after_start and part.startswith(_HEADER):
            pieces.append((_HEADER, 0))
            if len(part) > len(_HEADER):
                pieces.append((part[len(_HEADER):], 1))
            in_assistant = True
        else:
            pieces.append((part, 0))
        after_start = False
    texts = [p for p, _ in pieces]
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    mask: list[int] = []
    for piece_ids, (_, m) in zip(enc, pieces):
        ids += piece_ids
        mask += [m] * len(piece_ids)
    return ids, mask


def render_text(tokenizer, trace: dict) -> str:
    return chat_text(tokenizer, trace["messages"], trace.get("tools"), False)


def render_trace(tokenizer, trace: dict) -> tuple[list[int], list[int]]:
    """Whole trace -> (ids, loss mask). Raises MtrError if piecewise and whole-string tokenization
    disagree (an assistant turn starting with whitespace can do that: such a trace is bad data)."""
    text = render_text(tokenizer, trace)
    ids, mask = _segment_ids(tokenizer, text)
    whole = _as_list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if ids != whole:
        raise MtrError(f"trace {trace.get('id', '?')}: turn-by-turn tokenization differs from the whole text; "
                       "an assistant turn probably starts or ends with unusual whitespace")
    return ids, mask


def tool_turn_ids(tokenizer, observations: list[str]) -> list[int]:
    """Tokens that follow a model turn ended by <|im_end|>: the tool message(s), rendered as the
    template renders them, then the next generation prompt. Taken from the template itself."""
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    msgs += [{"role": "tool", "content": o} for o in observations]
    text = chat_text(tokenizer, msgs, None, True)
    cut = text.index(IM_END, text.index(IM_START + _HEADER)) + len(IM_END)
    ids, _ = _segment_ids(tokenizer, text[cut:])
    return ids


def assistant_text_to_message(text: str | bytes) -> dict:
    """Generated text of one assistant turn -> trace message (content + parsed tool_calls), such that
    the template re-renders the same text for template-shaped turns."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    for s in STOP_TOKENS:
        if text.endswith(s):
            text = text[: -len(s)]
    parsed = parse_turn(text)
    if parsed.kind != "tool_call":
        return {"role": "assistant", "content": text}
    content = text[: text.index("<tool_call>")]
    if content.endswith("\n"):  # the template writes "\n" before each <tool_call>
        content = content[:-1]
    calls = [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in parsed.calls]
    return {"role": "assistant", "content": content, "tool_calls": calls}


def assistant_turn_texts(tokenizer, trace: dict) -> list[str]:
    """The emitted text of each assistant turn as rendered (header and <|im_end|> excluded)."""
    text = render_text(tokenizer, trace)
    out = []
    start = 0
    while True:
        i = text.find(IM_START + _HEADER, start)
        if i < 0:
            return out
        a = i + len(IM_START + _HEADER)
        b = text.index(IM_END, a)
        out.append(text[a:b])
        start = b
