"""Models as tools on the real dev samples: oracle + corpus against the LLM roles (the local offline
Qwen2.5 through mtr_jax.llm), with constrained decoding (and, with --free, without).

    python scripts/llm_roles_report.py --data ../shared/data --per-dataset 100 --out report.json

Per dataset (HotpotQA, MuSiQue, 2Wiki):
- oracle AutoAgent + corpus ToolActor: traces kept, rejected by reason;
- ToolMaker llm: generated / valid / repaired / dropped (constrained and not);
- oracle AutoAgent + llm ToolActor on the template tools: observations valid on the first try /
  after a retry / replaced by an error (constrained and not), traces kept;
- llm AutoAgent (the teacher) + corpus ToolActor: traces kept, rejected by reason;
each with seconds per 100 records. Offline, CPU; minutes per dataset at the defaults.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from collections import Counter

from mtr_jax.data.loaders import load_records
from mtr_jax.llm.local import LocalLLM
from mtr_jax.tools.autoagent import AutoAgent
from mtr_jax.tools.toolactor import ToolActor
from mtr_jax.tools.toolmaker import ToolMaker

FILES = {"hotpotqa": "hotpotqa/dev_original_format.jsonl", "musique": "musique/dev_sample.jsonl",
         "2wikimultihopqa": "2wikimultihopqa/dev_sample.jsonl"}
SIZES = {"hotpotqa": 100, "musique": 50, "2wikimultihopqa": 50}


def _traces(agent, records, tool_sets):
    """All of a dataset's episodes in lockstep: each turn's calls (and teacher turns) are batched."""
    reasons, kept = Counter(), 0
    for trace, reason in agent.make_traces(records, tool_sets):
        kept += trace is not None
        if trace is None:
            reasons[reason] += 1
    return {"records": len(records), "kept": kept, "rejected": dict(reasons)}


def _per100(t0, n):
    return round((time.perf_counter() - t0) * 100 / max(n, 1), 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--per-dataset", type=int, default=0, help="records per dataset (0 = 100 / 50 / 50)")
    ap.add_argument("--model", default="offline:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--batch", type=int, default=16, help="conversations decoded together")
    ap.add_argument("--free", action="store_true", help="also run ToolMaker and ToolActor without constrained decoding")
    ap.add_argument("--datasets", default=",".join(FILES), help="comma-separated subset of " + ",".join(FILES))
    ap.add_argument("--roles", default="toolmaker,actor,teacher", help="comma-separated subset of the LLM roles to run")
    ap.add_argument("--out", default="llm_roles_report.json")
    a = ap.parse_args()
    llm = LocalLLM.load(a.model, max_len=2048, batch=a.batch, max_tokens=320)
    report = {"model": a.model, "datasets": {}}
    roles = set(a.roles.split(","))
    for name in a.datasets.split(","):
        rel = FILES[name]
        records = load_records(name, str(pathlib.Path(a.data) / rel))[: a.per_dataset or SIZES[name]]
        template = ToolMaker().make_batch(records)
        row = report["datasets"][name] = {}
        t0 = time.perf_counter()
        row["oracle+corpus"] = _traces(AutoAgent("oracle", ToolActor("corpus")), records, template)
        row["oracle+corpus"]["s_per_100"] = _per100(t0, len(records))
        say = lambda key: print(name, key, json.dumps(row[key]), flush=True)
        say("oracle+corpus")
        for constrained in ((True, False) if a.free else (True,)):
            llm.constrained = constrained
            tag = "constrained" if constrained else "free"
            if "toolmaker" in roles:
                t0 = time.perf_counter()
                maker = ToolMaker("llm", llm=llm, retries=1, max_tokens=320)
                maker.make_batch(records)
                row[f"toolmaker_{tag}"] = {**maker.stats.as_dict(), "s_per_100": _per100(t0, len(records))}
                say(f"toolmaker_{tag}")
            if "actor" not in roles:
                continue
            t0 = time.perf_counter()
            actor = ToolActor("llm", llm=llm, retries=1, backoff_s=0.0, max_tokens=200)
            res = _traces(AutoAgent("oracle", actor), records, template)
            c = actor.counters
            row[f"oracle+actor_{tag}"] = {**res, "calls": c["calls"], "valid_first_try": c["valid_first_try"],
                                           "valid_after_retry": c["valid_after_retry"],
                                           "replaced_by_error": c["replaced_by_error"], "s_per_100": _per100(t0, len(records))}
            say(f"oracle+actor_{tag}")
            pathlib.Path(a.out).write_text(json.dumps(report, indent=1))
        llm.constrained = True
        if "teacher" in roles:
            t0 = time.perf_counter()
            row["teacher+corpus"] = _traces(AutoAgent("llm", ToolActor("corpus"), complete=llm, max_tokens=160,
                                                      max_calls=3, keep_metric="em"), records, template)
            row["teacher+corpus"]["s_per_100"] = _per100(t0, len(records))
            say("teacher+corpus")
        print(name, json.dumps(row), flush=True)
        pathlib.Path(a.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(llm.stats))


if __name__ == "__main__":
    main()
