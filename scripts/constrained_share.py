"""The local backend with and without constrained decoding on the same 20 HotpotQA fixture records
(tests/test_llm_real.py's setting): ToolMaker tool definitions and ToolActor observations valid on
the first try (no retries), constrained vs free. Offline, the real Qwen2.5; ~10 min on a 2-core CPU.

    python scripts/constrained_share.py [--out share.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from mtr_jax.data.loaders import load_records
from mtr_jax.llm.local import LocalLLM
from mtr_jax.tools.toolactor import ToolActor
from mtr_jax.tools.toolmaker import ToolMaker

FIXTURE = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hotpotqa_dev_original_20.jsonl"


def _calls(records, tool_sets):
    """One call per record to its first model-made tool, arguments of the declared types."""
    items = []
    for r, tools in zip(records, tool_sets):
        if len(tools) < 3:  # no model-made tool kept for this record
            continue
        made = tools[2]
        props = made["function"]["parameters"]["properties"]
        scalar = {"string": r.question[:60], "integer": 1, "number": 1.5, "boolean": True}
        args = {k: [scalar[v["items"]["type"]]] if v["type"] == "array" else scalar[v["type"]] for k, v in props.items()}
        items.append(({"name": made["function"]["name"], "arguments": args}, tools, r))
    return items


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="constrained_share.json")
    a = ap.parse_args()
    records = load_records("hotpotqa", str(FIXTURE))
    llm = LocalLLM.load("offline:qwen2.5-coder-0.5b-instruct", max_len=2048, batch=20, max_tokens=320)
    out = {"records": len(records)}
    made = None
    for constrained in (True, False):
        llm.constrained = constrained
        tag = "constrained" if constrained else "free"
        t0 = time.perf_counter()
        maker = ToolMaker("llm", llm=llm, retries=0, max_tokens=320)
        sets = maker.make_batch(records)
        made = made or sets  # the actor's calls: the constrained run's made tools, the same for both
        out[f"toolmaker_{tag}"] = {**maker.stats.as_dict(), "s": round(time.perf_counter() - t0, 1)}
        print(tag, "toolmaker", out[f"toolmaker_{tag}"], flush=True)
        t0 = time.perf_counter()
        actor = ToolActor("llm", llm=llm, retries=0, max_tokens=256)
        actor.observe_batch(_calls(records, made))
        c = actor.counters
        out[f"actor_{tag}"] = {k: c[k] for k in ("calls", "valid_first_try", "invalid", "replaced_by_error")}
        out[f"actor_{tag}"]["s"] = round(time.perf_counter() - t0, 1)
        print(tag, "actor", out[f"actor_{tag}"], flush=True)
    pathlib.Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
