"""First-search style (whole question / keywords / no call) by question kind and EM, per eval stage.
usage: python query_styles.py DEMO_OUT_DIR"""
import collections, json, sys

for st in ("sft", "grpo"):
    c = collections.Counter()
    for line in open(f"{sys.argv[1]}/eval_{st}.jsonl"):
        r = json.loads(line)
        calls = r["trace"]["messages"][2].get("tool_calls") or []
        q = calls[0]["function"]["arguments"].get("query", "") if calls else None
        kind = ("person_country" if r["question"].startswith("In which") else
                "film_director" if "director" in r["question"] else "company_founder")
        style = "no call" if q is None else ("question" if q.startswith(("Where", "In which")) else "keywords")
        c[(kind, style, r["em"])] += 1
    print(st, ", ".join(f"{k} {s} EM={int(e)}: {n}" for (k, s, e), n in sorted(c.items())))
