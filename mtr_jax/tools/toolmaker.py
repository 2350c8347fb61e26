"""ToolMaker: classify a question, then emit its tool set (utility tools + tools for the question type).

Backends
- "template" (offline default): a fixed, small set — `search` and `lookup` for every question, plus
  `compare` (comparison, yes-no) or `calculator` (numeric, temporal). Descriptions are short because
  a tiny model reads them in every prompt.
- "llm": prompt -> JSON (tools.json_extract: mended by json_repair if need be) -> validate -> automatic
  repair -> re-prompt with the validator's messages (up to `retries`) -> drop with a reason.
  Generated tools are added to the utility tools.

`mtr make-tools --config C` writes one JSON line per record: {"id", "dataset", "qtype", "tools"}.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import time
from dataclasses import dataclass, field

from mtr_jax.data.records import QARecord
from mtr_jax import paths
from mtr_jax.errors import MtrError
from mtr_jax.llm import as_llm
from mtr_jax.tools.json_extract import extract_json
from mtr_jax.tools.jsonl import read_jsonl
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
"returns": <JSON Schema of the successful observation object>}}
Reply with the JSON list only."""

# What a constrained model writes (mtr_jax.llm, local backend): 1-2 tools whose parameter and result
# fields are typed scalars (or lists of them). `required` is not generated: the ToolMaker makes every
# parameter and result field required (as OpenAI's strict mode does), since a schema cannot say
# "required names must be property names".
_SCALAR = {"type": "string", "enum": ["string", "integer", "number", "boolean"]}
_FIELD = {"anyOf": [
    {"type": "object", "properties": {"type": _SCALAR, "description": {"type": "string", "maxLength": 120}},
     "required": ["type", "description"], "additionalProperties": False},
    {"type": "object", "properties": {
        "type": {"const": "array"},
        "items": {"type": "object", "properties": {"type": _SCALAR}, "required": ["type"], "additionalProperties": False},
        "description": {"type": "string", "maxLength": 120}},
     "required": ["type", "items", "description"], "additionalProperties": False},
]}
_FIELDS = {"type": "object", "patternProperties": {"^[a-z][a-z0-9_]{0,30}$": _FIELD}, "additionalProperties": False,
           "minProperties": 1, "maxProperties": 3}
GENERATION_SCHEMA = {
    "type": "array", "minItems": 1, "maxItems": 2,
    "items": {"type": "object", "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_]{2,40}$"},
            "description": {"type": "string", "minLength": 3, "maxLength": 160},
            "parameters": {"type": "object", "properties": {"type": {"const": "object"}, "properties": _FIELDS},
                           "required": ["type", "properties"], "additionalProperties": False}},
            "required": ["name", "description", "parameters"], "additionalProperties": False},
        "returns": {"type": "object", "properties": {"type": {"const": "object"}, "properties": _FIELDS},
                    "required": ["type", "properties"], "additionalProperties": False}},
        "required": ["type", "function", "returns"], "additionalProperties": False},
}


def complete_tool(defn):
    """The protocol's part of a proposed tool (not a repair): `returns` gains the error branch
    (every observation may be an error), and a constrained proposal, which has no `required`
    lists, requires all its fields."""
    if not isinstance(defn, dict):
        return defn
    d = copy.deepcopy(defn)
    fn = d.get("function")
    for schema in (fn.get("parameters") if isinstance(fn, dict) else None, d.get("returns")):
        if isinstance(schema, dict) and isinstance(schema.get("properties"), dict) and "required" not in schema:
            schema["required"] = sorted(schema["properties"])
    if isinstance(d.get("returns"), dict):
        d["returns"] = with_error_branch(d["returns"])
    return d


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
    json_repaired: int = 0  # replies whose JSON json_repair had to mend (tools.json_extract)
    drop_reasons: dict = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped += 1
        key = reason.split(":")[0][:80]
        self.drop_reasons[key] = self.drop_reasons.get(key, 0) + 1

    def as_dict(self) -> dict:
        return {"generated": self.generated, "valid": self.valid, "repaired": self.repaired,
                "dropped": self.dropped, "json_repaired": self.json_repaired, "drop_reasons": dict(self.drop_reasons)}


class ToolMaker:
    def __init__(self, backend: str = "template", generate=None, retries: int = 2, *, llm=None, max_tokens: int = 512):
        if backend not in ("template", "llm"):
            raise MtrError(f"tools.toolmaker: unknown backend {backend!r} (template | llm)")
        self.llm = as_llm(llm if llm is not None else generate)
        if backend == "llm" and self.llm is None:
            raise MtrError("tools.toolmaker=llm needs a model: set tools.llm (a local model) or tools.base_url")
        self.backend, self.retries, self.max_tokens = backend, retries, int(max_tokens)
        self.stats = MakeStats()

    def make(self, record: QARecord) -> list[dict]:
        return self.make_batch([record])[0]

    def make_batch(self, records: list[QARecord]) -> list[list[dict]]:
        if self.backend == "template":
            out = [template_tools(classify(r.question)) for r in records]
            n = sum(len(t) for t in out)
            self.stats.generated += n
            self.stats.valid += n
            return out
        return self._llm_tools(records)

    def _llm_tools(self, records: list[QARecord]) -> list[list[dict]]:
        """generated = valid (as proposed) + repaired (fixed mechanically) + dropped (with reason);
        the problems of dropped tools go back to the model for another attempt, in the same chat."""
        n = len(records)
        names = [{t["function"]["name"] for t in UTILITY_TOOLS} for _ in range(n)]
        kept: list[list[dict]] = [[] for _ in range(n)]
        convs = [[{"role": "user", "content": _LLM_PROMPT.format(qtype=classify(r.question), question=r.question,
                                                                   existing=", ".join(sorted(names[i])))}]
                 for i, r in enumerate(records)]
        todo = list(range(n))
        for _ in range(self.retries + 1):
            if not todo:
                break
            replies = self.llm.chat([convs[i] for i in todo], [GENERATION_SCHEMA] * len(todo), max_tokens=self.max_tokens)
            again = []
            for i, reply in zip(todo, replies):
                feedback = self._take(reply, names[i], kept[i])
                if feedback:
                    convs[i] = convs[i] + [{"role": "assistant", "content": reply if isinstance(reply, str) else ""},
                                           {"role": "user", "content": feedback}]
                    again.append(i)
            todo = again
        return [copy.deepcopy(UTILITY_TOOLS) + k for k in kept]

    def _take(self, reply, names: set, kept: list) -> str:
        """Validate one reply's tools into `kept`; -> feedback for another attempt ("" = done)."""
        try:
            if isinstance(reply, Exception):
                raise reply
            items, mended = extract_json(reply)
        except Exception as e:  # a failing teacher spoils this record only
            self.stats.drop(f"unreadable reply: {type(e).__name__}")
            return "Your previous reply was not a JSON list. Reply with the JSON list only."
        self.stats.json_repaired += int(mended)
        problems: list[str] = []
        for item in items if isinstance(items, list) else [items]:
            self.stats.generated += 1
            item = complete_tool(item)
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
            return ""
        return "Fix these problems and reply with the corrected JSON list only:\n- " + "\n- ".join(problems[:8])


# ---------------------------------------------------------------------------------------------
# CLI.


def read_tools_file(path) -> dict[str, list[dict]]:
    """make-tools output -> {"<dataset>/<id>": tools}."""
    return dict(read_jsonl(path, lambda d: (f"{d['dataset']}/{d['id']}", d["tools"]), key="data.tools",
                           expected='{"id", "dataset", "tools"} (make-tools output)',
                           hint=" (run `mtr make-tools` first, or leave it empty)"))


class ToolSetMaker:
    """The tools `mtr make-tools` wrote (`data.tools`), by record: what make-traces, GRPO rollouts
    and eval offer when that file is given. A record the file lacks gets `fallback`'s tools and is
    counted in `missing`."""

    def __init__(self, path, fallback: "ToolMaker"):
        self.path, self.sets, self.fallback, self.missing = str(path), read_tools_file(path), fallback, 0

    def make_batch(self, records: list[QARecord]) -> list[list[dict]]:
        return [self.make(r) for r in records]

    def make(self, record: QARecord) -> list[dict]:
        tools = self.sets.get(f"{record.dataset}/{record.id}")
        if tools is None:
            self.missing += 1
            return self.fallback.make(record)
        return tools


def cli(args) -> int:
    from mtr_jax.llm import make_llm
    from mtr_jax.progress import progress
    from mtr_jax.train.setup import load_records_from_config

    cfg = args.cfg
    records = load_records_from_config(cfg, limit=args.limit)
    out = paths.path(args.out or cfg.data.tools or paths.join(cfg.run.out_dir, "tools.jsonl"))  # local or gs://
    out.parent.mkdir(parents=True, exist_ok=True)
    llm = make_llm(cfg.tools) if cfg.tools.toolmaker == "llm" else None
    maker = ToolMaker(cfg.tools.toolmaker, llm=llm, retries=cfg.tools.retries, max_tokens=cfg.tools.max_tokens)
    batch = max(1, cfg.tools.llm_batch)
    bar = progress(len(records), desc="make-tools")
    t0 = time.perf_counter()
    with out.open("w", encoding="utf-8") as f:
        for j in range(0, len(records), batch):
            chunk = records[j: j + batch]
            for r, tools in zip(chunk, maker.make_batch(chunk)):
                f.write(json.dumps({"id": r.id, "dataset": r.dataset, "qtype": classify(r.question), "tools": tools},
                                   ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
    bar.close()
    summary = {"records": len(records), **maker.stats.as_dict(), "seconds": round(time.perf_counter() - t0, 1),
               "out": str(out)}
    print(json.dumps(summary), file=sys.stdout)
    return 0
