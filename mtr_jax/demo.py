"""`mtr demo`: the whole MTR pipeline on a real Qwen2.5, offline, on a CPU.

1. A synthetic multi-hop world (fictional people, cities, films, companies); held-out questions
   are about entities no training question mentions, so a right answer has to come from the tools.
2. ToolMaker (template) makes each question's tools; the AutoAgent (oracle) writes
   think -> call -> observe -> answer traces with the ToolActor (corpus backend over the world's
   pages) answering every call; only traces with a correct, grounded answer are kept.
3. The model: Qwen2.5-Coder-0.5B-Instruct from the `offline` extra by default (`--model` takes any
   Qwen2.5 `load_hf` accepts). Zero-shot eval on the held-out questions.
4. LoRA SFT on the traces (plus the `<tool_call>` rows of the embedding and head, which this
   checkpoint never learned), eval; GRPO with LoRA (reference = the SFT model's base), eval.
5. A table per stage (EM, F1 with a 90% bootstrap interval, tool calls, format failures, time), EM
   per question kind, a paired interval on GRPO - SFT; results.json, curves.png, the traces and
   per-question JSONL; the merged model exported with `export_hf`, reloaded by transformers, which
   answers one held-out question with real tool calls.

Besides results.json (one entry per stage), run.json holds the run's model, seeds, stage times,
peak RSS and the paired GRPO - SFT interval.

`mtr demo --tiny` is the from-scratch variant (a 1M-parameter Qwen2 and a tokenizer trained on the
world, `demo_tiny.py`): the test suite's smoke run, minutes on a CPU, learns little.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from dataclasses import dataclass, field

import jax
import numpy as np

from mtr_jax.config import Config, _deep_merge, apply_overrides, from_dict, read_yaml
from mtr_jax.errors import MtrError

DEFAULT_MODEL = "offline:qwen2.5-coder-0.5b-instruct"


@dataclass
class WorldConfig:
    seed: int = 0
    n_train: int = 64
    n_heldout: int = 100
    vocab_size: int = 1536  # --tiny only: its trained tokenizer
    n_people: int = 300
    n_cities: int = 60
    n_films: int = 200
    n_companies: int = 60
    kinds: list = field(default_factory=lambda: ["film_director_birthplace", "company_founder_birthplace", "person_country"])


@dataclass
class RealDemoConfig:
    model: str = DEFAULT_MODEL
    world: WorldConfig = field(default_factory=WorldConfig)
    config: dict = field(default_factory=dict)  # a standard Config (model/lora/sft/grpo/eval/run sections)
    # GRPO's questions: "all" training questions, or "probe": the ones the SFT model gets wrong
    # greedily plus as many it gets right (LoopTool's greedy capability probing), see grpo_pool
    grpo_pool: str = "all"


# Why these numbers (2-core CPU): an SFT step of 4 traces costs ~60 s at 0.5B as packed rows and
# about half with the shared system prompt + tool schemas run once (`sft.share_prefix`), so SFT
# gets 8 steps (32 traces; the loss is flat after ~6); every eval is 100 held-out questions, greedy,
# in one batch with the prompt prefix shared.
# GRPO gets 3 steps of 4 questions x 4 rollouts. (Tried 2026-12-07: 40% of the oracle's first
# searches as keywords, `tools.keyword_query_rate=0.4`, with GRPO at 16 x 4 and drop_equal_groups:
# +0.02 at 2.3x the GRPO time and 10.6 GB; docs/demo_runs.md.)
REAL_DEFAULTS = {
    "model": {"dtype": "bfloat16", "remat": True, "scan_layers": True},  # remat: 4 x 768 without it is > 24 GB
    "lora": {"enabled": True, "rank": 16, "alpha": 32.0, "base_dtype": "bfloat16",
             "trainable_tokens": ["<tool_call>", "</tool_call>"], "token_init": "pieces"},
    "sft": {"steps": 8, "batch_size": 4, "seq_len": 768, "grad_accum": 1, "share_prefix": True,
            "optim": {"lr": 1e-3, "warmup_steps": 2, "weight_decay": 0.0, "schedule": "cosine"}},
    "grpo": {"steps": 3, "batch_size": 4, "group_size": 4, "max_turns": 4, "max_new_tokens": 48, "max_len": 1024,
             "temperature": 1.0, "beta": 0.0, "optim": {"lr": 1e-4, "warmup_steps": 0, "schedule": "constant"}},
    "eval": {"max_turns": 4, "max_new_tokens": 48, "max_len": 1024, "batch_size": 100},
    "run": {"checkpoint_every": 1000, "seed": 0, "log_every": 1},
}

SMALL_REAL = {  # the tests' reduced real-model demo: every stage on the real weights, in minutes
    "world.n_train": 8, "world.n_heldout": 4,
    "config.sft.steps": 2, "config.sft.batch_size": 2, "config.grpo.steps": 1, "config.grpo.batch_size": 2,
    "config.grpo.group_size": 2, "config.grpo.max_new_tokens": 16, "config.grpo.max_turns": 2,
    "config.eval.max_new_tokens": 16, "config.eval.max_turns": 2,
}


def load_real_config(path, overrides, small, out_dir, model=None) -> tuple[RealDemoConfig, Config]:
    data = {"config": json.loads(json.dumps(REAL_DEFAULTS))}
    if path:
        data = _deep_merge(data, read_yaml(path))
    items = [f"{k}={v}" for k, v in SMALL_REAL.items()] if small else []
    items += list(overrides)
    sections = {f.name for f in dataclasses.fields(Config)} - {"model"}
    items = [f"config.{i}" if i.split(".", 1)[0] in sections or i.startswith("model.") else i for i in items]
    data = apply_overrides(data, items)
    if model:
        data["model"] = model
    demo = from_dict(RealDemoConfig, data)
    cfg = from_dict(Config, demo.config, "config")
    cfg.run.out_dir = out_dir
    cfg.model.init_from = demo.model  # LoRA checkpoints point at their base
    from mtr_jax.model import lora

    lora.validate(cfg.lora)
    if demo.grpo_pool not in ("all", "probe"):  # before any work
        raise MtrError(f"demo grpo_pool must be 'all' or 'probe', got {demo.grpo_pool!r}")
    return demo, cfg


# ---------------------------------------------------------------------------------------------
# Pieces both demos use.

def build_world(w: WorldConfig):
    from mtr_jax.data.synthetic import make_world, split_world

    world = make_world(seed=w.seed, n_people=w.n_people, n_cities=w.n_cities, n_films=w.n_films,
                       n_companies=w.n_companies)
    return split_world(world, n_train=w.n_train, n_heldout=w.n_heldout, seed=w.seed, kinds=w.kinds or None)


def make_traces(cfg: Config, train_q, out_dir: str):
    from mtr_jax.tools.autoagent import AutoAgent
    from mtr_jax.tools.toolactor import ToolActor
    from mtr_jax.tools.toolmaker import ToolMaker

    toolmaker = ToolMaker(backend="template")
    cfg.tools.cache = os.path.join(out_dir, "tool_cache.sqlite")
    actor = ToolActor.from_config(cfg.tools, cfg.tools.cache)
    agent = AutoAgent(backend="oracle", actor=actor, keep_metric=cfg.tools.keep_metric,
                      keep_threshold=cfg.tools.keep_threshold, keyword_query_rate=cfg.tools.keyword_query_rate,
                      brief_think_rate=cfg.tools.brief_think_rate)
    traces, rejected = [], {}
    # one batch: the keyword-query share is stratified over the batch's question templates
    for trace, why in agent.make_traces(list(train_q), [toolmaker.make(r) for r in train_q]):
        if trace is None:
            rejected[why] = rejected.get(why, 0) + 1
        else:
            traces.append(trace)
    with open(os.path.join(out_dir, "traces.jsonl"), "w") as f:
        for t in traces:
            f.write(json.dumps(t, ensure_ascii=False) + "\n")
    return toolmaker, actor, agent, traces, rejected


def question_kind(question: str) -> str:
    from mtr_jax.data.synthetic import KINDS

    for kind, (_, template) in KINDS.items():
        if question.startswith(template.split("{", 1)[0]):
            return kind
    return "other"


def bootstrap_interval(x: np.ndarray, level: float = 0.9, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of the mean over questions (x: one value per question; a paired
    difference when x = a - b on the same questions)."""
    x = np.asarray(x, np.float64)
    if len(x) == 0:
        return (0.0, 0.0)
    idx = np.random.default_rng(seed).integers(0, len(x), (reps, len(x)))
    means = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def stage_summary(rows: list[dict], seconds: float) -> dict:
    from mtr_jax.eval import summarize

    s = summarize(rows)
    em = np.array([r["em"] for r in rows], np.float64)
    fails = [r["end_reason"] != "answer" or r.get("format_errors", 0) > 0 for r in rows]
    lo, hi = bootstrap_interval(em)
    kinds: dict[str, list] = {}
    for r in rows:
        kinds.setdefault(question_kind(r["question"]), []).append(r["em"])
    return {"em": s["em"], "f1": s["f1"], "n": s["n"], "em_ci90": [lo, hi], "avg_tool_calls": s["avg_tool_calls"],
            "format_failure_rate": float(np.mean(fails)) if fails else 0.0, "seconds": round(seconds, 1),
            "em_by_kind": {k: float(np.mean(v)) for k, v in sorted(kinds.items())}}


def print_tables(results: dict, log) -> None:
    log("")
    log(f"{'stage':<12}{'EM':>7}{'90% CI':>16}{'F1':>7}{'calls/ep':>10}{'format fail':>13}{'time s':>8}{'n':>5}")
    for stage, r in results.items():
        if not isinstance(r, dict) or "em" not in r:
            continue
        ci = r.get("em_ci90", [r["em"], r["em"]])
        log(f"{stage:<12}{r['em']:>7.3f}{f'[{ci[0]:.2f}, {ci[1]:.2f}]':>16}{r['f1']:>7.3f}"
            f"{r.get('avg_tool_calls', 0.0):>10.2f}{r.get('format_failure_rate', 0.0):>13.2f}{r.get('seconds', 0.0):>8.0f}{r['n']:>5d}")
    kinds = sorted({k for r in results.values() if isinstance(r, dict) for k in r.get("em_by_kind", {})})
    if kinds:
        log("")
        log("EM by question kind:")
        log(f"{'kind':<28}" + "".join(f"{s:>11}" for s in results if "em" in results[s]))
        for k in kinds:
            log(f"{k:<28}" + "".join(f"{results[s].get('em_by_kind', {}).get(k, float('nan')):>11.3f}"
                                     for s in results if "em" in results[s]))


def write_eval(out_dir: str, stage: str, rows: list[dict]) -> None:
    with open(os.path.join(out_dir, f"eval_{stage}.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def eval_rows(cfg, model_cfg, params, tok, records, toolmaker, actor):
    from mtr_jax.eval import evaluate_records
    from mtr_jax.rollout.episodes import run_episodes
    from mtr_jax.sampling import Sampler, SamplingParams

    from mtr_jax.model import quant

    e = cfg.eval
    params, model_cfg = quant.for_sampling(params, model_cfg, e.quant)
    eos = [t for t in (tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id) if t is not None]
    sampler = Sampler(model_cfg, cache_len=e.max_len, eos_ids=eos, pad_id=tok.pad_token_id or 0)

    def rollout(recs):
        return run_episodes(sampler, params, tok, recs, [toolmaker.make(r) for r in recs], actor, group_size=1,
                            sampling=SamplingParams(greedy=True), max_turns=e.max_turns, max_new_tokens=e.max_new_tokens,
                            max_len=e.max_len, key=jax.random.PRNGKey(0))

    return evaluate_records(rollout, records, e.batch_size, None, progress=False)


def grpo_pool(mode: str, train_q, probe_rows: list[dict] | None, seed: int = 0) -> list:
    """The questions GRPO draws from. "all": every training question. "probe": the questions the SFT
    model answered wrong in a greedy pass over the training set, plus as many (seeded) it answered
    right, so each step holds failures to explore on and known questions to keep (with every
    training question, a step of 4 seldom meets one of SFT's few failures)."""
    if mode == "all":
        return list(train_q)
    if mode != "probe":
        raise MtrError(f"demo grpo_pool must be 'all' or 'probe', got {mode!r}")
    wrong = {r["id"] for r in probe_rows if r["em"] < 1.0}
    failed = [q for q in train_q if q.id in wrong]
    passed = [q for q in train_q if q.id not in wrong]
    if not failed:
        return list(train_q)
    rng = np.random.default_rng(seed)
    keep = sorted(rng.choice(len(passed), size=min(len(failed), len(passed)), replace=False).tolist())
    return failed + [passed[i] for i in keep]


def curves(out_dir: str) -> None:
    """One PNG with the SFT loss and the GRPO reward/EM curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def read(path):
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(l) for l in f if l.strip()]

    sft = read(os.path.join(out_dir, "sft", "metrics.jsonl"))
    grpo = read(os.path.join(out_dir, "grpo", "metrics.jsonl"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot([m["step"] for m in sft], [m["loss"] for m in sft], marker="o")
    axes[0].set(title="SFT loss (assistant tokens)", xlabel="step", yscale="log")
    for key in ("reward", "em"):
        axes[1].plot([m["step"] for m in grpo], [m.get(key) for m in grpo], label=key, marker="o")
    axes[1].set(title="GRPO rollouts", xlabel="step")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=100)
    plt.close(fig)


def answer_with_transformers(hf_dir, record, tools, actor, log, max_turns: int = 4, max_new_tokens: int = 48) -> None:
    """Reload the export with transformers and run one held-out question end to end: its
    generations, our ToolActor answering the calls it makes."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        log("      (install torch to see the export answer a question with transformers)")
        return
    from mtr_jax.traces import parse as trace_parse
    from mtr_jax.traces import render as trace_render

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its weight-loading bar is noise in a demo log
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    msgs = [{"role": "system", "content": trace_render.SYSTEM_PROMPT}, {"role": "user", "content": record.question}]
    ids = trace_render.render_prompt_ids(tok, msgs, tools)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    log(f"      transformers reloaded the export; Q: {record.question}  (gold: {record.golds[0]})")
    for _ in range(max_turns):
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=end, pad_token_id=tok.pad_token_id)
        new = out[0, len(ids):].tolist()
        text = tok.decode(new, skip_special_tokens=False)
        log("        > " + text.replace("<|im_end|>", "").strip().replace("\n", " ")[:220])
        ids = ids + new
        parsed = trace_parse.parse_turn(text)
        if parsed.kind != "tool_call":
            break
        obs = [trace_render.observation_text(o.content) for o in
               actor.observe_batch([(c, tools, record) for c in parsed.calls])]
        log("        < " + " ".join(obs).replace("\n", " ")[:220])
        ids = ids + trace_render.tool_turn_ids(tok, obs)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# ---------------------------------------------------------------------------------------------
# The real-model demo.

def run_demo(demo: RealDemoConfig, cfg: Config, out_dir: str, progress: bool = True, log=print) -> dict:
    from transformers import AutoTokenizer

    from mtr_jax.model import lora
    from mtr_jax.model.hf_io import export_hf, load_hf_params
    from mtr_jax.model.sources import tokenizer_dir
    from mtr_jax.train.grpo import train_grpo
    from mtr_jax.train.sft import train_sft, traces_to_examples

    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    train_q, held_q = build_world(demo.world)
    log(f"[1/7] world: {len(train_q)} training questions, {len(held_q)} held-out questions (unseen entities)")
    toolmaker, actor, _, traces, rejected = make_traces(cfg, train_q, out_dir)
    log(f"[2/7] ToolMaker (template) + AutoAgent (oracle) + ToolActor (corpus): kept {len(traces)} traces, "
        f"rejected {sum(rejected.values())} {rejected or ''}")

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(demo.model))
    params, model_cfg = load_hf_params(demo.model, dtype=cfg.lora.base_dtype if cfg.lora.enabled else cfg.model.param_dtype)
    m = cfg.model
    model_cfg = model_cfg.replace(dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers, remat_policy=m.remat_policy)
    if cfg.lora.enabled:  # the adapters' scale alpha / r, wherever params carry them
        model_cfg = model_cfg.replace(lora_alpha=float(cfg.lora.alpha))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    examples, dropped = traces_to_examples(tok, traces, cfg.sft.seq_len)
    lens = [len(e[0]) for e in examples]
    log(f"[3/7] model: {demo.model} ({n_params / 1e6:.0f}M params, {cfg.model.dtype} compute) loaded in "
        f"{time.perf_counter() - t0:.0f}s; traces: {len(examples)} ({dropped} longer than {cfg.sft.seq_len}), "
        f"mean {np.mean(lens):.0f} tokens")
    token_ids = lora.resolve_tokens(cfg.lora, tok) if cfg.lora.enabled else ()
    if token_ids and cfg.lora.token_init == "pieces":
        params = lora.init_rows_from_pieces(params, tok, token_ids)

    results: dict = {}
    timings: dict = {}

    def evaluate(stage, p, n):
        t = time.perf_counter()
        rows = eval_rows(cfg, model_cfg, p, tok, held_q, toolmaker, actor)
        results[stage] = stage_summary(rows, time.perf_counter() - t)
        write_eval(out_dir, stage, rows)
        r = results[stage]
        log(f"[{n}/7] eval {stage:<9} EM {r['em']:.3f} [{r['em_ci90'][0]:.2f}, {r['em_ci90'][1]:.2f}]  F1 {r['f1']:.3f}  "
            f"calls/ep {r['avg_tool_calls']:.2f}  format fail {r['format_failure_rate']:.2f}  ({r['seconds']:.0f}s, n={len(rows)}, "
            f"peak RSS so far {peak_rss_gb():.1f} GB)")
        return rows

    evaluate("untrained", params, 3)
    s = cfg.sft
    log(f"[4/7] SFT ({'LoRA r=%d' % cfg.lora.rank if cfg.lora.enabled else 'full'}): {s.steps} steps x "
        f"{s.batch_size} rows x {s.seq_len} tokens")
    t = time.perf_counter()
    params, _ = train_sft(cfg, model_cfg, params, examples, os.path.join(out_dir, "sft"), progress=progress,
                          token_ids=token_ids)
    timings["sft_s"] = round(time.perf_counter() - t, 1)
    sft_rows = evaluate("sft", params, 4)
    g = cfg.grpo
    t = time.perf_counter()
    probe = None
    if demo.grpo_pool == "probe":
        probe = eval_rows(cfg, model_cfg, params, tok, train_q, toolmaker, actor)
        write_eval(out_dir, "probe", probe)
        log(f"[5/7] probe: the SFT model, greedy, gets {sum(r['em'] < 1.0 for r in probe)} of {len(probe)} "
            f"training questions wrong ({time.perf_counter() - t:.0f}s)")
    pool = grpo_pool(demo.grpo_pool, train_q, probe, seed=cfg.run.seed)
    log(f"[5/7] GRPO: {g.steps} steps x {g.batch_size} questions x {g.group_size} rollouts, "
        f"from {len(pool)} training questions")
    params = train_grpo(cfg, model_cfg, params, tok, pool, actor, toolmaker, os.path.join(out_dir, "grpo"),
                        progress=progress)
    timings["grpo_s"] = round(time.perf_counter() - t, 1)
    grpo_rows = evaluate("grpo", params, 5)

    by_id = {r["id"]: r["em"] for r in sft_rows}
    diff = np.array([r["em"] - by_id[r["id"]] for r in grpo_rows if r["id"] in by_id])
    lo, hi = bootstrap_interval(diff)
    paired = {"grpo_minus_sft_em": float(diff.mean()) if len(diff) else 0.0, "ci90": [lo, hi], "n": int(len(diff))}
    curves(out_dir)
    hf_dir = os.path.join(out_dir, "hf")
    t = time.perf_counter()
    export_hf(params, model_cfg, hf_dir, tokenizer=tok, dtype="bfloat16")
    log(f"[6/7] merged LoRA model exported to {hf_dir} ({time.perf_counter() - t:.0f}s)")
    rec = held_q[0]
    answer_with_transformers(hf_dir, rec, toolmaker.make(rec), actor, log, max_turns=cfg.eval.max_turns,
                             max_new_tokens=cfg.eval.max_new_tokens)
    total = time.perf_counter() - t_start
    meta = {"model": demo.model, "seed": cfg.run.seed, "world_seed": demo.world.seed, "total_s": round(total, 1),
            "peak_rss_gb": round(peak_rss_gb(), 2), "traces": len(examples), **timings, "grpo_vs_sft": paired}
    with open(os.path.join(out_dir, "results.json"), "w") as f:  # the checked contract: one entry per stage
        json.dump(results, f, indent=2)
    with open(os.path.join(out_dir, "run.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print_tables(results, log)
    log(f"GRPO - SFT EM: {paired['grpo_minus_sft_em']:+.3f}, paired 90% CI [{lo:+.3f}, {hi:+.3f}] (n={paired['n']})")
    log(f"[7/7] done in {total:.0f}s, peak RSS {meta['peak_rss_gb']:.1f} GB; results.json, curves.png, traces.jsonl "
        f"and eval_*.jsonl in {out_dir}")
    return results


def cli(args) -> int:
    if getattr(args, "tiny", False):
        from mtr_jax import demo_tiny

        if getattr(args, "model", None):
            raise MtrError("--model and --tiny exclude each other (--tiny trains its own tiny model from scratch)")
        return demo_tiny.cli(args)
    demo, cfg = load_real_config(args.config, args.overrides, args.small, args.out, getattr(args, "model", None))
    from mtr_jax.model import sources

    sources.resolve(demo.model)  # a model that is not there is one line before any work
    results = run_demo(demo, cfg, args.out)
    if not results:
        raise MtrError("demo produced no results")
    return 0
