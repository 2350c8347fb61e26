"""`mtr bench grpo`: one GRPO iteration (rollouts + update), ours vs google-tunix's GRPOLearner.

Workload (identical on both sides): the demo's tiny Qwen2 shape (hidden 128, 4 layers, 4 query /
2 KV heads, intermediate 384, tied embeddings, random weights), the demo tokenizer (Qwen2.5
pipeline and chat template, trained on the synthetic world + its tool definitions), B questions
of the synthetic world rendered with their tools through the chat template (the SAME prompt token
ids on both sides), G samples each at temperature 1, up to N new tokens, stop on <|im_end|> or
<|endoftext|>, single turn (tunix's GRPOLearner has no tool turns; ours runs with max_turns=1),
rewards from a text-only function, then one optimiser step (mu=1, one minibatch) of the clipped
GRPO objective with beta * k3-KL against a frozen reference (the reference forward runs on both
sides), seq-mean-token-mean aggregation, AdamW + clip 1.0. The same B questions every iteration,
so no side recompiles after warm-up.

Timing: `warmup` iterations (compilation) are dropped; the next `iters` are timed wall-clock.
Ours: `GRPOTrainer.step` (rollout incl. rewards = `rollout_s`; old/ref log-probs + update =
`update_s`). Peer: `tunix_grpo_peer.py`, run by tunix's own Python (tunix pins safetensors<0.8, so
it lives in its own venv): set MTR_TUNIX_PYTHON to it. Unit: iterations/s; ratio = ours / peer.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

from mtr_jax.errors import MtrError

PEER_SCRIPT = pathlib.Path(__file__).with_name("tunix_grpo_peer.py")
TUNIX_VERSION = "0.1.7"
SETUP_HINT = (f"python3 -m venv /tmp/tunix-venv && /tmp/tunix-venv/bin/pip install google-tunix=={TUNIX_VERSION} "
              "&& export MTR_TUNIX_PYTHON=/tmp/tunix-venv/bin/python")
ARCH = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
FULL = dict(batch_size=8, group_size=4, max_new_tokens=64, warmup=2, iters=5)
QUICK = dict(batch_size=4, group_size=4, max_new_tokens=32, warmup=1, iters=2)


def peer_python() -> str:
    """The python of tunix's venv (MTR_TUNIX_PYTHON); a one-line MtrError says how to make one."""
    path = os.environ.get("MTR_TUNIX_PYTHON", "")
    if not path:
        raise MtrError(f"bench grpo needs google-tunix in its own venv (it pins safetensors<0.8); set MTR_TUNIX_PYTHON: {SETUP_HINT}")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise MtrError(f"MTR_TUNIX_PYTHON={path}: not an executable file; make the venv with: {SETUP_HINT}")
    return path


class _NoToolActor:
    """Single-turn workload: a turn that happens to call a tool gets an error observation (the
    episode ends there anyway at max_turns=1); no backend, so the peer's reward cost is matched."""

    def observe_batch(self, items):
        return ['{"error": "no tools in this benchmark"}' for _ in items]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # stdout is kept for the one JSON object


def _device() -> str:
    import jax

    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{d.platform}: {d.device_kind} x{jax.device_count()}"


def build_workload(size: dict, dtype: str, seed: int = 0):
    """-> (cfg, model_cfg, params, tokenizer, records, toolmaker) for GRPOTrainer."""
    import jax

    from mtr_jax.config import Config
    from mtr_jax.data.demo_tokenizer import demo_tokenizer_for_world
    from mtr_jax.data.synthetic import make_world, split_world
    from mtr_jax.model import qwen2
    from mtr_jax.tools.toolmaker import ToolMaker

    world = make_world(seed=seed)
    pool, _ = split_world(world, n_train=64, n_heldout=4, seed=seed)
    toolmaker = ToolMaker(backend="template")
    tok = demo_tokenizer_for_world(world, vocab_size=1536, extra_texts=[json.dumps(toolmaker.make(r)) for r in pool])
    records = pool[: size["batch_size"]]
    model_cfg = qwen2.Qwen2Config(vocab_size=-(-len(tok) // 64) * 64, max_position_embeddings=2048,
                                  eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), dtype=dtype,
                                  param_dtype="float32", **ARCH)
    params = qwen2.init_params(model_cfg, jax.random.PRNGKey(seed))
    cfg = Config()
    g = cfg.grpo
    g.batch_size, g.group_size, g.mu, g.minibatches = size["batch_size"], size["group_size"], 1, 1
    g.max_turns, g.max_new_tokens = 1, size["max_new_tokens"]
    g.temperature, g.top_k, g.top_p = 1.0, 0, 1.0
    g.beta, g.epsilon_low, g.epsilon_high = 0.04, 0.2, 0.2
    g.loss_agg, g.scale_std, g.drop_equal_groups = "seq-mean-token-mean", True, False
    g.optim.lr, g.optim.warmup_steps, g.optim.schedule = 1e-5, 0, "constant"
    g.optim.weight_decay, g.optim.clip_norm, g.optim.b1, g.optim.b2 = 0.01, 1.0, 0.9, 0.95
    return cfg, model_cfg, params, tok, records, toolmaker


def prompt_texts(tok, records, toolmaker):
    from mtr_jax.traces import render

    texts, ids = [], []
    for r in records:
        msgs, tools = render.build_messages(r.question), toolmaker.make(r)
        texts.append(render.chat_text(tok, msgs, tools, True))
        ids.append(render.render_prompt_ids(tok, msgs, tools))
    return texts, ids


def run_ours(cfg, model_cfg, params, tok, records, toolmaker, warmup: int, iters: int, max_prompt: int) -> dict:
    import jax
    import numpy as np

    from mtr_jax.train.grpo import GRPOTrainer

    # cache and episode budget as the peer's: the prompt bucket + N new tokens
    cfg.grpo.max_len = max_prompt + cfg.grpo.max_new_tokens
    tr = GRPOTrainer(cfg, model_cfg, params, tok, records, _NoToolActor(), toolmaker, total_steps=warmup + iters)
    key = jax.random.PRNGKey(1)
    its, cpu, roll, upd, lens, warm = [], [], [], [], [], []
    for i in range(warmup + iters):
        key, sub = jax.random.split(key)
        t, c = time.perf_counter(), time.process_time()
        met, _, _ = tr.step(records, sub)
        jax.block_until_ready(tr.params)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        if i < warmup:
            warm.append(dt)
            continue
        its.append(dt)
        cpu.append(dc)
        roll.append(met["rollout_s"])
        upd.append(met["update_s"])
        lens.append(met["response_len"])
    return {"iteration_s": its, "cpu_s": cpu, "warmup_s": warm, "iterations_per_s": len(its) / sum(its),
            "rollout_s": float(np.mean(roll)), "update_s": float(np.mean(upd)), "completion_len": float(np.mean(lens))}


def run_peer(python: str, spec: dict, timeout: int = 3600) -> dict:
    with tempfile.TemporaryDirectory(prefix="mtr-bench-grpo-") as d:
        spec_path = os.path.join(d, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ)
        env.setdefault("JAX_PLATFORMS", spec["platform"])
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        try:
            proc = subprocess.run([python, str(PEER_SCRIPT), spec_path], capture_output=True, text=True, env=env,
                                  timeout=timeout)
        except OSError as e:
            raise MtrError(f"MTR_TUNIX_PYTHON={python}: cannot run it ({e}); make the venv with: {SETUP_HINT}") from None
        except subprocess.TimeoutExpired:
            raise MtrError(f"bench grpo: the tunix peer ran past {timeout}s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        why = err[-1] if err else f"exit code {proc.returncode}, no JSON on stdout"
        if "No module named 'tunix'" in proc.stderr:
            why += f"; make the venv with: {SETUP_HINT}"
        raise MtrError(f"bench grpo: the tunix peer failed: {why}")
    return json.loads(lines[-1])


def run(args) -> dict:
    import jax

    python = peer_python()  # fail fast, before building anything
    size = dict(QUICK if getattr(args, "quick", False) else FULL)
    dtype = getattr(args, "dtype", None) or "float32"
    if dtype not in ("float32", "bfloat16"):
        raise MtrError(f"bench grpo --dtype={dtype}: expected float32 or bfloat16")
    cfg, model_cfg, params, tok, records, toolmaker = build_workload(size, dtype)
    texts, ids = prompt_texts(tok, records, toolmaker)
    max_prompt = 1 << (max(len(i) for i in ids) - 1).bit_length()
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with tempfile.TemporaryDirectory(prefix="mtr-bench-tok-") as tok_dir:
        tok.save_pretrained(tok_dir)
        spec = {
            "model": {k: getattr(model_cfg, k) for k in (*ARCH, "vocab_size", "head_dim")},
            "dtype": dtype, "seed": 0, "batch_size": size["batch_size"], "group_size": size["group_size"],
            "max_new_tokens": size["max_new_tokens"], "warmup": size["warmup"], "iters": size["iters"],
            "temperature": 1.0, "beta": cfg.grpo.beta, "epsilon": cfg.grpo.epsilon_low, "eos_ids": eos,
            "optim": {k: getattr(cfg.grpo.optim, k) for k in ("lr", "b1", "b2", "weight_decay", "clip_norm")},
            "prompts": texts, "prompt_ids": ids, "tokenizer_dir": tok_dir, "platform": jax.devices()[0].platform,
        }
        B, G, N = size["batch_size"], size["group_size"], size["max_new_tokens"]
        _log(f"bench grpo: ours, B={B} G={G} N={N}, prompts {min(map(len, ids))}-{max(map(len, ids))} tokens, "
             f"{size['warmup']} warm-up + {size['iters']} timed iterations")
        ours = run_ours(cfg, model_cfg, params, tok, records, toolmaker, size["warmup"], size["iters"], max_prompt)
        _log(f"bench grpo: ours {ours['iterations_per_s']:.4g} it/s; now google-tunix ({python})")
        peer = run_peer(python, spec)
    if not peer.get("prompt_ids_match", False):
        raise MtrError("bench grpo: the peer tokenized the prompts differently (the workloads would differ)")
    return {
        "workload": "grpo", "unit": "iterations/s",
        "ours": round(ours["iterations_per_s"], 4), "peer": round(peer["iterations_per_s"], 4),
        "peer_name": peer["peer_name"], "ratio": round(ours["iterations_per_s"] / peer["iterations_per_s"], 3),
        "device": _device(),
        "rollout_s": round(ours["rollout_s"], 4), "update_s": round(ours["update_s"], 4),
        "peer_rollout_s": round(peer["rollout_s"], 4), "peer_update_s": round(peer["update_s"], 4),
        "iteration_s": [round(x, 4) for x in ours["iteration_s"]],
        "peer_iteration_s": [round(x, 4) for x in peer["iteration_s"]],
        # process CPU seconds per iteration (all threads): less sensitive than wall time to other
        # load on a shared machine; cpu_ratio = peer / ours (higher is better for us)
        "cpu_s": [round(x, 3) for x in ours.get("cpu_s", [])], "peer_cpu_s": [round(x, 3) for x in peer.get("cpu_s", [])],
        "cpu_ratio": (round(sum(peer["cpu_s"]) / len(peer["cpu_s"]) / (sum(ours["cpu_s"]) / len(ours["cpu_s"])), 3)
                      if peer.get("cpu_s") and ours.get("cpu_s") else None),
        "warmup_s": [round(x, 2) for x in ours["warmup_s"]], "peer_warmup_s": [round(x, 2) for x in peer["warmup_s"]],
        "completion_len": round(ours["completion_len"], 1), "peer_completion_len": round(peer["completion_len"], 1),
        "shape": {**ARCH, "vocab_size": model_cfg.vocab_size, "dtype": dtype},
        "batch": {"B": B, "G": G, "max_new_tokens": N, "prompt_tokens": [len(i) for i in ids],
                  "prompt_bucket": max_prompt, "max_turns": 1, "beta": cfg.grpo.beta, "mu": 1, "minibatches": 1,
                  "warmup": size["warmup"], "iters": size["iters"]},
        "peer_versions": peer.get("versions", {}),
    }
