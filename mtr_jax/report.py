"""`mtr report RUN_DIR`: PNG plots and a markdown summary of a run's metrics.

Reads RUN_DIR/metrics.jsonl (one JSON object per line, as `train/metrics.py` writes: "step",
"stage" and any numeric metrics; missing keys are fine) and, when present, RUN_DIR/results.json
(EM/F1 per stage or dataset). Writes RUN_DIR/report/<panel>.png and RUN_DIR/report/report.md.
RUN_DIR may be a local path or gs://... (etils.epath). A line cut by a kill is skipped and counted.
"""

from __future__ import annotations

import io
import json
import math

from mtr_jax.errors import MtrError

# panel name -> (title, metric keys or key prefixes ending in "/"); the rest get a panel each.
PANELS = [
    ("loss", "Loss", ["loss"]),
    ("reward", "Reward and its components", ["reward", "reward/"]),
    ("em", "Exact match / F1", ["em", "f1"]),
    ("kl", "KL(policy || reference)", ["kl"]),
    ("response_len", "Response length (tokens)", ["response_len"]),
    ("tool_calls", "Tool calls per episode", ["tool_calls"]),
    ("tokens_per_s", "Throughput (tokens/s)", ["tokens_per_s"]),
    ("lr", "Learning rate", ["lr"]),
    ("grad_norm", "Gradient norm", ["grad_norm"]),
]


def _path(p):
    from etils import epath

    return epath.Path(p)


def read_metrics(run_dir) -> tuple[list[dict], int]:
    """(records, number of skipped lines). Raises MtrError when there is no usable metrics file."""
    f = _path(run_dir) / "metrics.jsonl"
    if not f.exists():
        raise MtrError(f"{f}: not found (is {run_dir} a run directory?)")
    recs, bad = [], 0
    for line in f.read_text().splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(r, dict) or not isinstance(r.get("step"), (int, float)):
            bad += 1
            continue
        recs.append(r)
    if not recs:
        raise MtrError(f"{f}: no metric records ({bad} unreadable lines)")
    return recs, bad


def series(recs: list[dict]) -> dict:
    """{stage: {key: (steps, values)}} for every numeric key (None / non-finite values dropped)."""
    out: dict = {}
    for r in recs:
        stage = str(r.get("stage", "run"))
        for k, v in r.items():
            if k in ("step", "stage") or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            steps, vals = out.setdefault(stage, {}).setdefault(k, ([], []))
            steps.append(int(r["step"]))
            vals.append(float(v))
    return out


def _panel_keys(all_keys: set[str]) -> list[tuple[str, str, list[str]]]:
    used: set[str] = set()
    panels = []
    for name, title, pats in PANELS:
        keys = sorted(k for k in all_keys if any(k == p or (p.endswith("/") and k.startswith(p)) for p in pats))
        keys.sort(key=lambda k: (k not in pats, k))  # the main key first
        if keys:
            panels.append((name, title, keys))
            used.update(keys)
    for k in sorted(all_keys - used):
        panels.append((k.replace("/", "_"), k, [k]))
    return panels


def _smooth(vals: list[float], n: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(vals):
        acc += v
        if i >= n:
            acc -= vals[i - n]
        out.append(acc / min(i + 1, n))
    return out


def plot_panel(title: str, keys: list[str], ser: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for stage in ser:
        for k in keys:
            if k not in ser[stage]:
                continue
            steps, vals = ser[stage][k]
            label = f"{stage}: {k}" if len(ser) > 1 or len(keys) > 1 else k
            if len(vals) > 20:  # noisy RL curves: faint raw line + moving average
                line = ax.plot(steps, vals, alpha=0.3, linewidth=1)[0]
                ax.plot(steps, _smooth(vals, max(len(vals) // 20, 2)), color=line.get_color(), label=label, linewidth=2)
            else:
                ax.plot(steps, vals, marker="o", markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def summarize(ser: dict, skipped: int, run_dir, pngs: list[str], results: dict | None) -> str:
    lines = [f"# Run report: {run_dir}", ""]
    for stage, keys in ser.items():
        steps = sorted({s for st, _ in keys.values() for s in st})
        lines += [f"## {stage}", "", f"steps {steps[0]}..{steps[-1]} ({len(steps)} logged)", "",
                  "| metric | first | last | min | max | mean of last 10% |", "|---|---|---|---|---|---|"]
        for k in sorted(keys):
            _, v = keys[k]
            tail = v[-max(1, len(v) // 10):]
            lines.append(f"| {k} | {_fmt(v[0])} | {_fmt(v[-1])} | {_fmt(min(v))} | {_fmt(max(v))} | {_fmt(sum(tail) / len(tail))} |")
        lines.append("")
    if results:
        lines += ["## Results (results.json)", "", "| name | EM | F1 | n |", "|---|---|---|---|"]
        for name, r in results.items():
            if isinstance(r, dict):
                lines.append(f"| {name} | {_fmt(r.get('em', float('nan')))} | {_fmt(r.get('f1', float('nan')))} | {r.get('n', '')} |")
        lines.append("")
    if skipped:
        lines += [f"{skipped} unreadable line(s) in metrics.jsonl were skipped.", ""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    return "\n".join(lines)


def make_report(run_dir) -> dict:
    """Writes the PNGs and report.md; returns {"pngs": [...], "report": path, "skipped": n}."""
    recs, skipped = read_metrics(run_dir)
    ser = series(recs)
    out = _path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    all_keys = {k for st in ser.values() for k in st}
    pngs = []
    for name, title, keys in _panel_keys(all_keys):
        (out / f"{name}.png").write_bytes(plot_panel(title, keys, ser))
        pngs.append(f"{name}.png")
    results = None
    rf = _path(run_dir) / "results.json"
    if rf.exists():
        try:
            results = json.loads(rf.read_text())
        except json.JSONDecodeError:
            raise MtrError(f"{rf}: invalid JSON") from None
        if not isinstance(results, dict):
            raise MtrError(f"{rf}: expected an object of {{name: {{em, f1, n}}}}")
    md = summarize(ser, skipped, run_dir, pngs, results)
    (out / "report.md").write_text(md)
    return {"pngs": [str(out / p) for p in pngs], "report": str(out / "report.md"), "skipped": skipped}


def cli(args) -> int:
    res = make_report(args.run_dir)
    print(f"report: {len(res['pngs'])} plots + {res['report']}" + (f" ({res['skipped']} bad lines skipped)" if res["skipped"] else ""))
    return 0
