"""`mtr bench forward|sample|grpo`: each workload is a module here with `run(args) -> dict` that
measures ours and a named peer in the same run. With `--json` exactly one JSON object goes to
stdout (`workload, unit, ours, peer, peer_name, ratio, device` + extras); progress goes to stderr."""

from __future__ import annotations

import importlib
import json

from mtr_jax.errors import MtrError

WORKLOADS = ("forward", "sample", "grpo")
REQUIRED = ("workload", "unit", "ours", "peer", "peer_name", "ratio", "device")


def cli(args) -> int:
    if args.workload not in WORKLOADS:
        raise MtrError(f"unknown bench workload '{args.workload}' (known: {', '.join(WORKLOADS)})")
    try:
        mod = importlib.import_module(f"mtr_jax.bench.{args.workload}")
    except ModuleNotFoundError as e:
        if e.name == f"mtr_jax.bench.{args.workload}":
            raise MtrError(f"bench workload '{args.workload}' is not available in this build") from None
        raise
    res = mod.run(args)
    missing = [k for k in REQUIRED if k not in res]
    if missing:
        raise RuntimeError(f"bench {args.workload}: result lacks {missing}")
    if getattr(args, "json", False):
        print(json.dumps(res))
    else:
        print(table(res))
    return 0


def table(res: dict) -> str:
    """A readable two-column table of a result (nested dicts flattened with dots)."""
    rows = []

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        else:
            rows.append((prefix, f"{v:.4g}" if isinstance(v, float) else str(v)))

    walk("", res)
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)
