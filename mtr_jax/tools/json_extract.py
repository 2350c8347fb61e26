"""The JSON value in a model reply, for the ToolActor's LLM backend (an observation object) and the
ToolMaker's (a list of tool definitions). Strict parsing first, tolerating prose and ``` fences around
the value; only when that finds nothing whole does `json_repair` mend the slips models make
(trailing commas, single quotes, a reply cut off before its closing brackets). Callers learn whether
the value was repaired, and validate it either way."""

from __future__ import annotations

import json
from typing import Any

import json_repair

_DECODER = json.JSONDecoder()
_TYPES = {"{": dict, "[": list}


def extract_json(text: str, openers: str = "[{") -> tuple[Any, bool]:
    """-> (value, repaired): the first JSON object ("{") or array ("[") in `text`, as `openers` allow.

    Strict: the first opener at which a whole value parses, as json.loads reads it. A value that lies
    inside an earlier candidate which failed past its start (`{"results": [{...},]}`, or a reply cut off
    mid-list) is a piece of that candidate: the candidate is repaired instead. With no strict value,
    the first candidate is repaired. A repaired value counts only if it is a non-empty object or array
    of the opener's kind; ValueError when there is none (prose, "", garbage)."""
    starts = sorted(i for i, ch in enumerate(text) if ch in openers)
    failed: list[tuple[int, int]] = []  # (start, where strict parsing gave up)
    for i in starts:
        try:
            value, _ = _DECODER.raw_decode(text, i)
        except json.JSONDecodeError as e:
            failed.append((i, e.pos))
            continue
        outer = next((j for j, pos in failed if pos > i), None)
        if outer is not None:
            fixed = _repair(text, outer)
            if fixed is not None:
                return fixed, True
        return value, False
    fixed = _repair(text, failed[0][0]) if failed else None
    if fixed is None:
        kind = "object" if openers == "{" else "value"
        raise ValueError(f"no JSON {kind} in the reply")
    return fixed, True


def extract_json_object(text: str) -> dict:
    """The first JSON object in a model reply (repaired if need be); ValueError if there is none."""
    return extract_json(text, "{")[0]


def _repair(text: str, start: int) -> Any:
    span = text[start:]
    fence = span.find("```")
    if fence > 0:
        span = span[:fence]
    value = json_repair.repair_json(span, return_objects=True)
    want = _TYPES[text[start]]
    if isinstance(value, list) and want is dict and value and isinstance(value[0], dict):
        value = value[0]  # json_repair returns several top-level values as a list
    return value if isinstance(value, want) and value else None
