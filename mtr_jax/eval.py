"""`mtr eval`: run the agent (greedy multi-turn rollouts against the configured ToolActor) over one
or more datasets and score Exact Match / F1 with the official normalisation.

Writes one JSON line per example to OUT/<dataset>.jsonl (question, golds, prediction, em, f1,
turns, tool calls, the full trace) and OUT/results.json ({dataset: {em, f1, n, ...}}), and prints
the table dataset x {EM, F1, avg turns, avg tool calls, invalid-call rate} plus the average.
Resumable: ids already in OUT/<dataset>.jsonl are skipped on a re-run.

Several processes (a pod slice): `eval.batch_size` is per process (as `sft.batch_size` and
`grpo.batch_size` are); each global batch is split into contiguous shares, one per process; each
process runs its share (its ToolActor answering its calls), the scored rows are gathered in batch
order, and only process 0 writes them.
"""

from __future__ import annotations

import json

import numpy as np

from mtr_jax import paths
from mtr_jax.model import quant
from mtr_jax.parallel import hosts


def score_episode(e) -> dict:
    from mtr_jax.rewards import exact_match, f1

    pred = e.answer or ""
    return {
        "id": e.record.id, "dataset": e.record.dataset, "question": e.record.question, "golds": e.record.golds,
        "prediction": pred, "em": exact_match(pred, e.record.golds), "f1": f1(pred, e.record.golds),
        "turns": e.counters["turns"], "tool_calls": e.counters["tool_calls"],
        "invalid_calls": e.counters["invalid_calls"], "format_errors": e.counters.get("format_errors", 0),
        "end_reason": e.end_reason, "trace": e.trace(),
    }


def summarize(rows: list[dict]) -> dict:
    if not rows:
        return {"em": 0.0, "f1": 0.0, "n": 0, "avg_turns": 0.0, "avg_tool_calls": 0.0, "invalid_call_rate": 0.0}
    calls = sum(r["tool_calls"] for r in rows)
    return {
        "em": float(np.mean([r["em"] for r in rows])), "f1": float(np.mean([r["f1"] for r in rows])), "n": len(rows),
        "avg_turns": float(np.mean([r["turns"] for r in rows])),
        "avg_tool_calls": float(np.mean([r["tool_calls"] for r in rows])),
        "invalid_call_rate": float(sum(r["invalid_calls"] for r in rows) / max(calls, 1)),
    }


def evaluate_records(run_rollout, records, batch_size: int, out_path: str | None = None, progress: bool = True,
                     desc: str = "eval") -> list[dict]:
    """Score `records` in batches with `run_rollout(records) -> episodes`; append rows to out_path
    as they finish, and skip ids already there (resume)."""
    done: dict[str, dict] = {}
    writer = out_path and hosts.index() == 0
    synced = paths.SyncedFile(out_path) if out_path else None  # gs://: a local copy, synced per batch
    out_path = synced.local if synced else None
    if out_path and out_path.exists():
        with open(out_path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                    done[row["id"]] = row
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut by a kill: redo that example
    todo = [r for r in records if r.id not in done]
    rows = [done[r.id] for r in records if r.id in done]
    fout = open(out_path, "a") if writer else None
    from mtr_jax.progress import progress as make_bar

    bar = make_bar(len(records), len(rows), desc, progress)
    try:
        step = batch_size * hosts.count()  # batch_size per process, like sft/grpo.batch_size
        for i in range(0, len(todo), step):
            chunk = todo[i : i + step]
            for row in _score_batch(run_rollout, chunk):
                rows.append(row)
                if fout:
                    fout.write(json.dumps(row, ensure_ascii=False) + "\n")
                    fout.flush()
            bar.update(len(chunk))
            if synced and writer:
                synced.sync()
    finally:
        if fout:
            fout.close()
            synced.sync()
        bar.close()
    return rows


def _score_batch(run_rollout, chunk: list) -> list[dict]:
    """Score one batch. Several processes: each runs its contiguous share (padded to the same
    size with copies of the batch's first record, whose rows are dropped) and all get every row."""
    if not hosts.multi():
        return [score_episode(e) for e in run_rollout(chunk)]
    a, b = hosts.local_share(len(chunk))
    k = -(-len(chunk) // hosts.count())
    mine = chunk[a:b]
    eps = run_rollout(mine + [chunk[0]] * (k - len(mine)))[: len(mine)]
    return hosts.gather_objects([score_episode(e) for e in eps])


def format_table(results: dict) -> str:
    head = f"{'dataset':<18}{'EM':>8}{'F1':>8}{'n':>6}{'turns':>8}{'calls':>8}{'invalid':>9}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        lines.append(
            f"{name:<18}{r['em']:>8.3f}{r['f1']:>8.3f}{r['n']:>6d}{r.get('avg_turns', 0):>8.2f}"
            f"{r.get('avg_tool_calls', 0):>8.2f}{r.get('invalid_call_rate', 0):>9.3f}"
        )
    return "\n".join(lines)


def average_row(results: dict) -> dict:
    keys = ["em", "f1", "avg_turns", "avg_tool_calls", "invalid_call_rate"]
    avg = {k: float(np.mean([r[k] for r in results.values()])) for k in keys} if results else {k: 0.0 for k in keys}
    avg["n"] = int(sum(r["n"] for r in results.values()))
    return avg


def cli(args) -> int:
    import jax

    from mtr_jax.sampling import Sampler, SamplingParams
    from mtr_jax.rollout.episodes import run_episodes
    from mtr_jax.train.setup import (check_out_dir, check_tools, load_datasets, load_tokenizer, make_actor,
                                     make_toolmaker, setup_model)

    cfg = args.cfg
    if args.checkpoint:
        cfg.model.init_from = args.checkpoint
    limit = args.limit if args.limit is not None else cfg.eval.limit
    out_dir = args.out or paths.join(cfg.run.out_dir, "eval")  # local or gs://
    check_out_dir(cfg, out_dir)
    paths.makedirs(out_dir)
    tokenizer = load_tokenizer(cfg)
    datasets = load_datasets(cfg, limit=limit, on_error="skip")
    actor, toolmaker = make_actor(cfg, out_dir, for_eval=True), make_toolmaker(cfg)  # never the gold answer
    check_tools(actor, toolmaker)
    quant.validate(cfg.eval.quant, "eval.quant")
    mesh, model_cfg, params = setup_model(cfg)
    e = cfg.eval
    params, model_cfg = quant.for_sampling(params, model_cfg, e.quant)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    sampler = Sampler(model_cfg, cache_len=e.max_len, eos_ids=[i for i in eos if i is not None],
                      pad_id=tokenizer.pad_token_id or 0, mesh=mesh)

    def rollout(recs):
        return run_episodes(sampler, params, tokenizer, recs, toolmaker.make_batch(recs), actor, group_size=1,
                            sampling=SamplingParams(greedy=True), max_turns=e.max_turns, max_new_tokens=e.max_new_tokens,
                            max_len=e.max_len, key=jax.random.PRNGKey(0))

    results = {}
    for name, (records, skipped) in datasets.items():
        rows = evaluate_records(rollout, records, e.batch_size, paths.join(out_dir, f"{name}.jsonl"), desc=name)
        results[name] = summarize(rows)
        results[name]["skipped_malformed"] = skipped
    results["average"] = average_row(results)
    if hosts.index() == 0:
        paths.path(paths.join(out_dir, "results.json")).write_text(json.dumps(results, indent=2))
    if actor.cache is not None:
        actor.cache.sync()
    print(format_table(results))
    print(f"per-example JSONL and results.json in {out_dir}")
    return 0
