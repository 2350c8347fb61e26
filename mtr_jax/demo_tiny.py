"""`mtr demo --tiny`: the whole MTR pipeline from scratch (a 1M-parameter Qwen2 and a tokenizer
trained on the world), offline, on a CPU, in minutes: the test suite's smoke run. It learns little
(held-out EM ~0.1 after SFT); `mtr demo` (demo.py) is the real-model demo.

1. A synthetic multi-hop world: fictional people, cities, films and companies; bridge and
   comparison questions; held-out questions about entities never seen in training.
2. ToolMaker (template backend) makes each question's tools; the AutoAgent (oracle) writes
   think -> call -> observe -> answer traces with the ToolActor (corpus backend over the world's
   entity pages) answering every call; only traces with a correct, grounded answer are kept.
3. A byte-level BPE tokenizer is trained on the world's text, with Qwen2.5's special tokens and
   official chat template; a tiny Qwen2 is initialised from scratch.
4. SFT on the traces, then GRPO with the composite trace reward (rollouts from the jitted sampler,
   tool turns answered by the ToolActor), each evaluated on the held-out questions (greedy).
5. A table of EM/F1 (untrained / SFT / GRPO), results.json, PNG training curves, and the final
   model exported to Hugging Face format (loaded back with transformers when torch is installed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import jax
import numpy as np

from mtr_jax.config import Config, apply_overrides, from_dict, read_yaml, _deep_merge
from mtr_jax.demo import WorldConfig as RealWorldConfig
from mtr_jax.errors import MtrError


@dataclass
class WorldConfig(RealWorldConfig):
    n_train: int = 400  # from scratch, more traces; many entities, so memorising names does not pay


@dataclass
class DemoConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    arch: dict = field(default_factory=lambda: dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True,
        attention_block=128,  # block-causal training attention: the demo's SFT step ~1.5x faster
    ))
    config: dict = field(default_factory=dict)  # a standard Config (sft/grpo/eval/run sections)


DEMO_DEFAULTS = {
    "model": {"dtype": "bfloat16", "param_dtype": "float32"},  # bf16 compute, f32 master weights
    "sft": {"steps": 300, "batch_size": 8, "seq_len": 768, "grad_accum": 1,
            "optim": {"lr": 3e-3, "warmup_steps": 20, "weight_decay": 0.0, "schedule": "cosine"}},
    "grpo": {"steps": 8, "batch_size": 8, "group_size": 4, "max_turns": 4, "max_new_tokens": 64, "max_len": 768,
             "temperature": 1.0, "beta": 0.0, "optim": {"lr": 2e-4, "warmup_steps": 0, "schedule": "constant"}},
    "eval": {"max_turns": 4, "max_new_tokens": 64, "max_len": 768, "batch_size": 50},
    "run": {"checkpoint_every": 100, "seed": 0},
}

SMALL = {  # a smoke configuration for tests: every stage runs, nothing is expected to learn much
    "world.n_train": 40, "world.n_heldout": 8,
    "arch.hidden_size": 64, "arch.intermediate_size": 128, "arch.num_hidden_layers": 2,
    "config.sft.steps": 4, "config.sft.batch_size": 4, "config.grpo.steps": 2, "config.grpo.batch_size": 2,
    "config.grpo.group_size": 2, "config.grpo.max_new_tokens": 24, "config.eval.max_new_tokens": 24,
    "config.run.checkpoint_every": 2,
}


def load_demo_config(path: str | None, overrides: list[str], small: bool, out_dir: str) -> tuple[DemoConfig, Config]:
    # the arch defaults go in first, so `arch.hidden_size=256` (or a YAML `arch:` section) changes
    # one field instead of replacing the whole dict (which silently built a 24-layer default Qwen2)
    data = {"arch": dict(DemoConfig().arch), "config": json.loads(json.dumps(DEMO_DEFAULTS))}
    if path:
        data = _deep_merge(data, read_yaml(path))
    items = [f"{k}={v}" for k, v in SMALL.items()] if small else []
    items += list(overrides)
    # plain section keys (sft.steps=...) address the standard Config
    sections = {f.name for f in dataclasses.fields(Config)}
    items = [f"config.{i}" if i.split(".", 1)[0] in sections else i for i in items]
    data = apply_overrides(data, items)
    demo = from_dict(DemoConfig, data)
    _check_arch(demo.arch)
    cfg = from_dict(Config, demo.config, "config")
    cfg.run.out_dir = out_dir
    return demo, cfg


_ARCH_SET_BY_DEMO = ("vocab_size", "eos_token_id", "dtype", "param_dtype")


def _check_arch(arch: dict) -> None:
    """`arch` holds Qwen2Config fields: unknown keys, wrong types and heads that do not divide are a
    one-line error before any work starts (not a TypeError after the world and tokenizer are built)."""
    from mtr_jax.model.qwen2 import Qwen2Config

    for k in _ARCH_SET_BY_DEMO:
        if k in arch:
            raise MtrError(f"arch.{k} is set by the demo itself (from its tokenizer and model.dtype); remove it")
    from_dict(Qwen2Config, arch, "arch")


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def run_demo(demo: DemoConfig, cfg: Config, out_dir: str, progress: bool = True, log=print) -> dict:
    from mtr_jax.demo import build_world, make_traces
    from mtr_jax.model import qwen2
    from mtr_jax.train.grpo import train_grpo
    from mtr_jax.train.sft import train_sft, traces_to_examples

    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    w = demo.world
    train_q, held_q = build_world(w)
    log(f"[1/6] world: {len(train_q)} training questions, {len(held_q)} held-out questions (unseen entities)")
    toolmaker, actor, agent, traces, rejected = make_traces(cfg, train_q, out_dir)
    log(f"[2/6] AutoAgent (oracle) + ToolActor (corpus): kept {len(traces)} traces, rejected {sum(rejected.values())} {rejected or ''}")

    tok = sibling_tokenizer(w, toolmaker, agent)
    tok.save_pretrained(os.path.join(out_dir, "tokenizer"))
    model_cfg = qwen2.Qwen2Config(vocab_size=_round_up(len(tok), 64), eos_token_id=tok.eos_token_id,
                                  dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, **demo.arch)
    params = qwen2.init_params(model_cfg, jax.random.PRNGKey(cfg.run.seed))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    examples, dropped = traces_to_examples(tok, traces, cfg.sft.seq_len)
    lens = [len(e[0]) for e in examples]
    log(f"[3/6] tokenizer: {len(tok)} tokens; model: Qwen2 {n_params / 1e6:.2f}M params; "
        f"traces: {len(examples)} ({dropped} too long), mean {np.mean(lens):.0f} tokens")

    results = {}

    def evaluate(stage, p):
        from mtr_jax.demo import eval_rows, write_eval
        from mtr_jax.eval import summarize

        rows = eval_rows(cfg, model_cfg, p, tok, held_q, toolmaker, actor)
        results[stage] = {k: v for k, v in summarize(rows).items() if k in ("em", "f1", "n", "avg_tool_calls")}
        write_eval(out_dir, stage, rows)
        log(f"      {stage:<10} EM {results[stage]['em']:.3f}  F1 {results[stage]['f1']:.3f}  (n={len(rows)})")
        return rows

    evaluate("untrained", params)
    log(f"[4/6] SFT: {cfg.sft.steps} steps x {cfg.sft.batch_size} rows x {cfg.sft.seq_len} tokens")
    params, _ = train_sft(cfg, model_cfg, params, examples, os.path.join(out_dir, "sft"), progress=progress)
    evaluate("sft", params)
    g = cfg.grpo
    log(f"[5/6] GRPO: {g.steps} steps x {g.batch_size} questions x {g.group_size} rollouts")
    params = train_grpo(cfg, model_cfg, params, tok, train_q, actor, toolmaker, os.path.join(out_dir, "grpo"),
                        progress=progress)
    evaluate("grpo", params)

    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    from mtr_jax.demo import answer_with_transformers, curves

    curves(out_dir)
    from mtr_jax.model.hf_io import export_hf

    hf_dir = os.path.join(out_dir, "hf")
    export_hf(params, model_cfg, hf_dir, tokenizer=tok)
    log(f"[6/6] exported to {hf_dir}")
    rec = held_q[0]
    answer_with_transformers(hf_dir, rec, toolmaker.make(rec), actor, log, max_turns=cfg.eval.max_turns,
                             max_new_tokens=cfg.eval.max_new_tokens)
    log("")
    log(f"{'stage':<12}{'EM':>8}{'F1':>8}{'n':>6}")
    for stage, r in results.items():
        log(f"{stage:<12}{r['em']:>8.3f}{r['f1']:>8.3f}{r['n']:>6d}")
    log(f"done in {time.perf_counter() - t_start:.0f}s; results.json, curves.png and traces in {out_dir}")
    return results


def sibling_tokenizer(w: WorldConfig, toolmaker, agent, n_worlds: int = 4):
    """A byte-level BPE (Qwen2.5 special tokens and chat template) trained on the text of SIBLING
    worlds from the same generator: their pages, questions and rendered oracle traces. So no
    entity of the demo world, trained on or held out, is a whole token: every name is spelled in
    the same syllable pieces, and copying a name the model has never seen is learnable (a held-out
    name that were one token of its own would have an embedding no gradient ever trained)."""
    from mtr_jax.data.demo_tokenizer import train_demo_tokenizer
    from mtr_jax.data.synthetic import make_world, split_world
    from mtr_jax.traces.render import render_text

    texts, traces = [], []
    for i in range(n_worlds):
        sib = make_world(seed=w.seed + 1000 + i, n_people=w.n_people, n_cities=w.n_cities, n_films=w.n_films,
                         n_companies=w.n_companies)
        texts += sib.texts()
        qs, _ = split_world(sib, n_train=50, n_heldout=10, seed=w.seed + i, kinds=w.kinds or None)
        traces += [t for t in (agent.make_trace(r, toolmaker.make(r))[0] for r in qs) if t is not None]
    boot = train_demo_tokenizer(texts, vocab_size=w.vocab_size)
    return train_demo_tokenizer(texts + [render_text(boot, t) for t in traces], vocab_size=w.vocab_size)


def cli(args) -> int:
    demo, cfg = load_demo_config(args.config, args.overrides, args.small, args.out)
    results = run_demo(demo, cfg, args.out)
    if not results:
        raise MtrError("demo produced no results")
    return 0
