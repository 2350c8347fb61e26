"""Tool definitions and their validation.

A tool definition is OpenAI-compatible plus our `returns` schema for the observation:

    {"type": "function",
     "function": {"name": "search", "description": "...", "parameters": <JSON Schema, type object>},
     "returns": <JSON Schema of the observation object>}

Protocol rule: every observation is a JSON object, and every tool's `returns` must also accept the
error observation `{"error": {"code": str, "message": str}}` (ToolMaker wraps success schemas as
`{"anyOf": [<success>, ERROR_SCHEMA]}`), so an unknown tool, bad arguments or a failing backend
always yield an observation that is valid against the declared schema.

Every check returns a list of problems in words a model (or a person) can act on; empty = valid.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_ARGS_CHARS = 4096  # canonical JSON size cap for one call's arguments (huge arguments are an error)
_MAX_MSG = 240  # jsonschema messages echo the instance: keep them short

ERROR_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            "required": ["code", "message"],
            "additionalProperties": False,
        }
    },
    "required": ["error"],
    "additionalProperties": False,
}

_TOP_KEYS = {"type", "function", "returns"}
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}


def canonical_json(obj: Any) -> str:
    """One spelling per value (sorted keys, no spaces): cache keys and size limits use it."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def error_observation(code: str, message: str) -> dict:
    return {"error": {"code": str(code), "message": _short(str(message), 600)}}


def is_error(obs: Any) -> bool:
    return isinstance(obs, dict) and "error" in obs


def with_error_branch(returns: dict) -> dict:
    """`returns` widened to also accept the error observation (idempotent)."""
    if accepts_error(returns):
        return copy.deepcopy(returns)
    return {"anyOf": [copy.deepcopy(returns), copy.deepcopy(ERROR_SCHEMA)]}


def accepts_error(returns: Any) -> bool:
    try:
        return not list(_validator(returns).iter_errors(error_observation("x", "y")))
    except Exception:  # an invalid schema accepts nothing
        return False


def for_template(defs: list[dict]) -> list[dict]:
    """What the chat template receives: the OpenAI part only (no `returns`: it is our protocol, and a
    small model reads every prompt token)."""
    return [{"type": "function", "function": d["function"]} for d in defs]


# ---------------------------------------------------------------------------------------------
# Compiled validators are cached by schema text: the fuzz/rollout loops validate the same few schemas.

_CACHE: dict[str, Draft202012Validator] = {}
_LOCK = threading.Lock()


def _validator(schema: Any) -> Draft202012Validator:
    key = canonical_json(schema)
    v = _CACHE.get(key)
    if v is None:
        Draft202012Validator.check_schema(schema)
        v = Draft202012Validator(schema)
        with _LOCK:
            if len(_CACHE) > 4096:
                _CACHE.clear()
            _CACHE[key] = v
    return v


def _short(s: str, n: int = _MAX_MSG) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _schema_problems(schema: Any, what: str) -> list[str]:
    if not isinstance(schema, dict):
        return [f"{what} must be a JSON Schema object, got {type(schema).__name__}"]
    try:
        Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "/".join(str(p) for p in e.absolute_path) or "(root)"
        return [f"{what} is not a valid JSON Schema (Draft 2020-12) at {path}: {_short(e.message)}"]
    except Exception as e:  # e.g. a non-string key or an unhashable value
        return [f"{what} is not a valid JSON Schema: {_short(str(e))}"]
    return []


def validate_tool(defn: Any) -> list[str]:
    """Problems with one tool definition (empty list = valid)."""
    if not isinstance(defn, dict):
        return [f"a tool definition must be an object, got {type(defn).__name__}"]
    probs: list[str] = []
    extra = set(defn) - _TOP_KEYS
    if extra:
        probs.append(f"unknown top-level keys {sorted(map(str, extra))}; allowed: type, function, returns")
    if defn.get("type") != "function":
        probs.append('"type" must be "function"')
    fn = defn.get("function")
    if not isinstance(fn, dict):
        return probs + ['"function" must be an object with name, description, parameters']
    name = fn.get("name")
    label = f"tool {name!r}" if isinstance(name, str) else "tool"
    if not isinstance(name, str) or not NAME_RE.match(name):
        probs.append(f"{label}: name must match ^[A-Za-z0-9_-]{{1,64}}$ (letters, digits, _ or -), got {name!r}")
    extra = set(fn) - _FUNCTION_KEYS
    if extra:
        probs.append(f"{label}: unknown keys in function {sorted(map(str, extra))}; allowed: name, description, parameters")
    desc = fn.get("description")
    if not isinstance(desc, str) or not desc.strip():
        probs.append(f"{label}: description must be a non-empty string")
    params = fn.get("parameters")
    sp = _schema_problems(params, f"{label}: parameters")
    probs += sp
    if not sp:
        if params.get("type") != "object":
            probs.append(f'{label}: parameters must have "type": "object"')
        props = params.get("properties", {})
        if not isinstance(props, dict):
            probs.append(f"{label}: parameters.properties must be an object")
            props = {}
        req = params.get("required", [])
        missing = [r for r in req if r not in props] if isinstance(req, list) else []
        if missing:
            probs.append(f"{label}: required {missing} not in parameters.properties {sorted(props)}")
    if "returns" not in defn:
        probs.append(f"{label}: missing \"returns\" (JSON Schema of the observation object)")
    else:
        rp = _schema_problems(defn["returns"], f"{label}: returns")
        probs += rp
        if not rp and not accepts_error(defn["returns"]):
            probs.append(
                f"{label}: returns must also accept the error observation "
                '{"error": {"code": "...", "message": "..."}} (wrap it as {"anyOf": [<schema>, ERROR_SCHEMA]})'
            )
    return probs


def validate_toolset(defs: Any) -> list[str]:
    """Problems with a whole tool set: each definition, plus unique names."""
    if not isinstance(defs, list) or not defs:
        return ["a tool set must be a non-empty list of tool definitions"]
    probs: list[str] = []
    seen: set[str] = set()
    for i, d in enumerate(defs):
        probs += [f"tools[{i}]: {p}" for p in validate_tool(d)]
        name = d.get("function", {}).get("name") if isinstance(d, dict) and isinstance(d.get("function"), dict) else None
        if isinstance(name, str):
            if name in seen:
                probs.append(f"tools[{i}]: duplicate tool name {name!r}: names must be unique in a tool set")
            seen.add(name)
    return probs


def _instance_problems(schema: dict, value: Any, what: str) -> list[str]:
    probs = []
    for e in sorted(_validator(schema).iter_errors(value), key=lambda e: list(map(str, e.absolute_path)))[:5]:
        path = ".".join(str(p) for p in e.absolute_path)
        where = f"{what} '{path}'" if path else what
        if e.validator == "required":
            probs.append(f"{where}: {_short(e.message)}")
        elif e.validator == "additionalProperties":
            allowed = sorted(schema_at(schema, e.absolute_schema_path).get("properties", {}))
            probs.append(f"{where}: {_short(e.message)}; allowed keys: {allowed}")
        else:
            probs.append(f"{where}: {_short(e.message)}")
    return probs


def schema_at(schema: dict, schema_path) -> dict:
    """The sub-schema that holds the failing keyword (for 'allowed keys' hints)."""
    node: Any = schema
    for p in list(schema_path)[:-1]:
        try:
            node = node[p]
        except (KeyError, IndexError, TypeError):
            return {}
    return node if isinstance(node, dict) else {}


def validate_arguments(defn: dict, args: Any) -> list[str]:
    """Problems with a call's arguments against the tool's `parameters` schema."""
    name = defn["function"]["name"]
    if not isinstance(args, dict):
        return [f"arguments of {name!r} must be a JSON object, got {type(args).__name__}"]
    size = len(canonical_json(args))
    if size > MAX_ARGS_CHARS:
        return [f"arguments of {name!r} are too large ({size} chars, limit {MAX_ARGS_CHARS}); send shorter values"]
    return _instance_problems(defn["function"]["parameters"], args, f"argument of {name!r}")


def validate_observation(defn: dict | None, obs: Any) -> list[str]:
    """Problems with an observation against the tool's `returns` (ERROR_SCHEMA when no tool is known)."""
    schema = defn.get("returns", ERROR_SCHEMA) if defn else ERROR_SCHEMA
    if not isinstance(obs, dict):
        return [f"an observation must be a JSON object, got {type(obs).__name__}"]
    if not _validator(schema).is_valid(obs):
        # Explain against the success branch: "not valid under any of the given schemas" helps no one.
        branches = [b for b in schema.get("anyOf", []) if b != ERROR_SCHEMA] if "error" not in obs else []
        if len(branches) == 1:
            return _instance_problems(branches[0], obs, "observation")
    return _instance_problems(schema, obs, "observation")
