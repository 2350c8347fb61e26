"""ToolMaker: classify a question, then emit its tool set (utility tools + tools for the question type).

Backends
- "template" (offline default): a fixed, small set — `search` and `lookup` for every question, plus
  `compare` (comparison, yes-no) or `calculator` (numeric, temporal). Descriptions are short because
  a tiny model reads them in every prompt.
- "llm": prompt -> JSON -> validate -> automatic repair -> re-prompt with the validator's messages
  (up to `retries`) -> drop with a reason. Generated tools are added to the utility tools.

`mtr make-tools --config C` writes one JSON line per record: {"id", "dataset", "qtype", "tools"}.
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

from mtr_jax.data.records import QARecord
from mtr_jax.errors import MtrError
from mtr_jax.tools.schema import NAME_RE, validate_tool, with_error_branch

QTYPES = ("bridge", "comparison", "yes-no", "temporal", "numeric")

# ---------------------------------------------------------------------------------------------
# Classification: surface rules over the question text (dataset labels are often missing/coarse).

_AUX = r"^(is|are|was|were|do|does|did|can|could|has|have|had|will|would|should|shall)\b"
_COMPARE = re.compile(
    r"\b(older|younger|earlier|later|first|last|more|less|fewer|larger|smaller|bigger|longer|shorter|"
    r"taller|higher|lower|greater|closer|farther|further|most|least|oldest|youngest|earliest|latest)\b"
)
_NUMERIC = re.compile(r"^(how (many|much|old|long|tall|far|big|large|high)|what (percentage|number|amount|is the population))\b")
_TEMPORAL = re.compile(r"^(when\b|(in |during )?(what|which) (year|date|month|decade|century|day)\b|what time\b)")


def classify(question: str) -> str:
    """bridge (also compositional) | comparison | yes-no | temporal | numeric."""
    q = " ".join(question.lower().split())
    if re.match(_AUX, q):
        return "yes-no"
    if _NUMERIC.match(q):
        return "numeric"
    if _TEMPORAL.match(q):
        return "temporal"
    if (" or " in q or " and " in q) and _COMPARE.search(q):
        return "comparison"
    if re.match(r"^(which|who|what)\b", q) and re.search(r",[^,]+ or [^,]+\?$", q):
        return "comparison"  # a choice between two named options: "Which ..., A or B?"
    return "bridge"


# ---------------------------------------------------------------------------------------------
# Template tools.

PASSAGES = {
    "type": "object",
    "properties": {
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"title": {"type": "string"}, "text": {"type": "string"}},
                "required": ["title", "text"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["results"],
    "additionalProperties": False,
}


def tool(name: str, description: str, properties: dict, required: list[str], returns: dict) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required, "additionalProperties": False},
        },
        "returns": with_error_branch(returns),
    }


SEARCH = tool(
    "search",
    "Search the documents. Returns the best matching passages.",
    {"query": {"type": "string", "minLength": 1, "maxLength": 300, "description": "keywords or a question"}},
    ["query"],
    PASSAGES,
)
LOOKUP = tool(
    "lookup",
    "Get the document with this title.",
    {"title": {"type": "string", "minLength": 1, "maxLength": 200, "description": "page title"}},
    ["title"],
    PASSAGES,
)
COMPARE = tool(
    "compare",
    "Compare two values (numbers or dates).",
    {
        "a": {"type": "string", "minLength": 1, "maxLength": 100},
        "b": {"type": "string", "minLength": 1, "maxLength": 100},
        "relation": {"type": "string", "enum": ["earlier", "later", "greater", "less", "equal"]},
    },
    ["a", "b", "relation"],
    {
        "type": "object",
        "properties": {"result": {"type": "boolean"}, "a": {"type": "string"}, "b": {"type": "string"}},
        "required": ["result"],
        "additionalProperties": False,
    },
)
CALCULATOR = tool(
    "calculator",
    "Evaluate arithmetic, e.g. 2019 - 1987.",
    {"expression": {"type": "string", "minLength": 1, "maxLength": 100}},
    ["expression"],
    {"type": "object", "properties": {"value": {"type": "number"}}, "required": ["value"], "additionalProperties": False},
)
UTILITY_TOOLS = [SEARCH, LOOKUP]
TASK_TOOLS = {"bridge": [], "comparison": [COMPARE], "yes-no": [COMPARE], "temporal": [CALCULATOR], "numeric": [CALCULATOR]}


def template_tools(qtype: str) -> list[dict]:
    return copy.deepcopy(UTILITY_TOOLS + TASK_TOOLS.get(qtype, []))


# ---------------------------------------------------------------------------------------------
# LLM backend.

_LLM_PROMPT = """You design tools for answering a multi-hop question. Question type: {qtype}.
Question: {question}
Existing tools: {existing}.
Propose 1 or 2 extra task-specific tools as a JSON list. Each item:
{{"type": "function", "function": {{"name": "<letters, digits, _ or ->", "description": "<short>",
"parameters": {{"type": "object", "properties": {{...}}, "required": [...]}}}},
"returns": <JSON Schema of the observation object>}}
Reply with the JSON list only."""


def _extract_json(text: str):
    """First JSON value in a model reply (tolerates prose and ``` fences around it)."""
    text = text.strip()
    for opener in ("[", "{"):
        i = text.find(opener)
        while i >= 0:
            try:
                obj, _ = json.JSONDecoder().raw_decode(text[i:])
                return obj
            except ValueError:
                i = text.find(opener, i + 1)
    raise ValueError("no JSON value found in the reply")


def repair_tool(defn) -> dict | None:
    """Mechanical fixes for common slips; None if there is nothing to work with."""
    if not isinstance(defn, dict):
        return None
    d = copy.deepcopy(defn)
    if "function" not in d and "name" in d:  # a bare function object
        d = {"type": "function", "function": {k: d.pop(k) for k in list(d) if k in ("name", "description", "parameters")}, **d}
    d["type"] = "function"
    fn = d.get("function")
    if not isinstance(fn, dict):
        return None
    for k in list(fn):
        if k not in ("name", "description", "parameters"):
            fn.pop(k)
    for k in list(d):
        if k not in ("type", "function", "returns"):
            d.pop(k)
    if isinstance(fn.get("name"), str) and not NAME_RE.match(fn["name"]):
        fn["name"] = re.sub(r"[^A-Za-z0-9_-]+", "_", fn["name"]).strip("_")[:64] or "tool"
    if not isinstance(fn.get("description"), str) or not fn["description"].strip():
        fn["description"] = fn.get("name", "tool").replace("_", " ")
    params = fn.get("parameters")
    if not isinstance(params, dict):
        params = fn["parameters"] = {"type": "object", "properties": {}}
    params.setdefault("type", "object")
    props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
    params["properties"] = props
    if isinstance(params.get("required"), list):
        params["required"] = [r for r in params["required"] if r in props]
    if isinstance(d.get("returns"), dict):
        d["returns"] = with_error_branch(d["returns"])
    return d


@dataclass
class MakeStats:
    generated: int = 0
    valid: int = 0
    repaired: int = 0
    dropped: int = 0
    drop_reasons: dict = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped += 1
        key = reason.split(":")[0][:80]
        self.drop_reasons[key] = self.drop_reasons.get(key, 0) + 1

    def as_dict(self) -> dict:
        return {"generated": self.generated, "valid": self.valid, "repaired": self.repaired,
                "dropped": self.dropped, "drop_reasons": dict(self.drop_reasons)}


class ToolMaker:
    def __init__(self, backend: str = "template", generate: Callable[[str], str] | None = None, retries: int = 2):
        if backend not in ("template", "llm"):
            raise MtrError(f"tools.toolmaker: unknown backend {backend!r} (template | llm)")
        if backend == "llm" and generate is None:
            raise MtrError("tools.toolmaker=llm needs a generate(prompt) -> text callable (or an HTTP endpoint)")
        self.backend, self.generate, self.retries = backend, generate, retries
        self.stats = MakeStats()

    def make(self, record: QARecord) -> list[dict]:
        qtype = classify(record.question)
        base = template_tools(qtype)
        if self.backend == "template":
            self.stats.generated += len(base)
            self.stats.valid += len(base)
            return base
        base = copy.deepcopy(UTILITY_TOOLS)
        return base + self._llm_tools(record, qtype, base)

    def _llm_tools(self, record: QARecord, qtype: str, base: list[dict]) -> list[dict]:
        """generated = valid (as proposed) + repaired (fixed mechanically) + dropped (with reason);
        the problems of dropped tools go back to the model for another attempt."""
        names = {t["function"]["name"] for t in base}
        prompt = _LLM_PROMPT.format(qtype=qtype, question=record.question, existing=", ".join(sorted(names)))
        kept: list[dict] = []
        feedback = ""
        for _ in range(self.retries + 1):
            try:
                items = _extract_json(self.generate(prompt + feedback))
            except Exception as e:  # a failing teacher spoils this record only
                self.stats.drop(f"unreadable reply: {type(e).__name__}")
                feedback = "\nYour previous reply was not a JSON list. Reply with the JSON list only."
                continue
            problems: list[str] = []
            for item in items if isinstance(items, list) else [items]:
                self.stats.generated += 1
                probs = validate_tool(item)
                cand, repaired = item, False
                if probs:
                    cand, repaired = repair_tool(item), True
                    probs = validate_tool(cand) if cand is not None else probs
                if not probs and cand["function"]["name"] in names:
                    probs = [f"tool {cand['function']['name']!r}: duplicate name, already have {sorted(names)}"]
                if probs:
                    self.stats.drop(probs[0])
                    problems += probs
                    continue
                names.add(cand["function"]["name"])
                kept.append(cand)
                self.stats.repaired += int(repaired)
                self.stats.valid += int(not repaired)
            if not problems:
                break
            feedback = "\nFix these problems and reply with the corrected JSON list only:\n- " + "\n- ".join(problems[:8])
        return kept


# ---------------------------------------------------------------------------------------------
# CLI.


def read_tools_file(path) -> dict[str, list[dict]]:
    """make-tools output -> {"<dataset>/<id>": tools}."""
    import pathlib

    p = pathlib.Path(path)
    if not p.exists():
        raise MtrError(f"data.tools: file not found: {p} (run `mtr make-tools` first, or leave it empty)")
    out = {}
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out[f"{d['dataset']}/{d['id']}"] = d["tools"]
            except (ValueError, KeyError, TypeError):
                raise MtrError(f"{p} line {i}: expected {{\"id\", \"dataset\", \"tools\"}} (make-tools output)") from None
    return out


class ToolSetMaker:
    """The tools `mtr make-tools` wrote (`data.tools`), by record: what make-traces, GRPO rollouts
    and eval offer when that file is given. A record the file lacks gets `fallback`'s tools and is
    counted in `missing`."""

    def __init__(self, path, fallback: "ToolMaker"):
        self.path, self.sets, self.fallback, self.missing = str(path), read_tools_file(path), fallback, 0

    def make(self, record: QARecord) -> list[dict]:
        tools = self.sets.get(f"{record.dataset}/{record.id}")
        if tools is None:
            self.missing += 1
            return self.fallback.make(record)
        return tools


def load_dataset_records(cfg, limit: int | None) -> list[QARecord]:
    """Records of every dataset in `cfg.data.datasets` through the loaders module."""
    from mtr_jax.data.loaders import load_records

    if not cfg.data.datasets:
        raise MtrError("config key 'data.datasets' is empty: list [{name, path}] entries")
    out: list[QARecord] = []
    n = limit if limit is not None else (cfg.data.limit or None)
    for i, ds in enumerate(cfg.data.datasets):
        if not isinstance(ds, dict) or "name" not in ds:
            raise MtrError(f"config key 'data.datasets[{i}]' must be a mapping with 'name' (and 'path')")
        recs = load_records(ds["name"], ds.get("path", ""))
        out += recs[:n] if n else recs
    return out


def _make_generate(cfg):
    if cfg.tools.toolmaker != "llm":
        return None
    from mtr_jax.tools.toolactor import HttpChat

    if not cfg.tools.base_url:
        raise MtrError("tools.toolmaker=llm needs tools.base_url (an OpenAI-compatible endpoint)")
    return HttpChat.from_config(cfg.tools).complete


def cli(args) -> int:
    cfg = args.cfg
    records = load_dataset_records(cfg, args.limit)
    out = pathlib.Path(args.out or cfg.data.tools or pathlib.Path(cfg.run.out_dir) / "tools.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    maker = ToolMaker(cfg.tools.toolmaker, generate=_make_generate(cfg), retries=cfg.tools.retries)
    with open(out, "w", encoding="utf-8") as f:
        for r in records:
            tools = maker.make(r)
            f.write(json.dumps({"id": r.id, "dataset": r.dataset, "qtype": classify(r.question), "tools": tools}, ensure_ascii=False) + "\n")
    summary = {"records": len(records), **maker.stats.as_dict(), "out": str(out)}
    print(json.dumps(summary), file=sys.stdout)
    return 0
