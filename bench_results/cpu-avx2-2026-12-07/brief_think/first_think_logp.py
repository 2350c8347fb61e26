"""p(brief first think) = p_brief / (p_brief + p_long) of the two whole first turns (same query) under a demo's
SFT params, for held-out questions of each kind.
usage: python first_think_logp.py DEMO_DIR [N per kind]"""
import json, os, sys
import numpy as np, jax, jax.numpy as jnp
from mtr_jax import demo as D
from mtr_jax.tools.autoagent import BRIEF_THINK, SEARCH_THINK, question_template
from mtr_jax.traces.render import render_trace, build_messages
demo_dir = sys.argv[1]; n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
demo, cfg = D.load_real_config(None, [], False, "/tmp/s15/x")
from transformers import AutoTokenizer
from mtr_jax.model.hf_io import load_hf_params
from mtr_jax.model.sources import tokenizer_dir
from mtr_jax.train.checkpoint import load_params
from mtr_jax.model import qwen2
train_q, held_q = D.build_world(demo.world)
tools = [json.loads(l) for l in open(os.path.join(demo_dir, "traces.jsonl"))][0]["tools"]
tok = AutoTokenizer.from_pretrained(tokenizer_dir(demo.model))
_, mc = load_hf_params(demo.model, dtype=cfg.lora.base_dtype)
params, _ = load_params(os.path.join(demo_dir, "sft", "checkpoints"), dtype=cfg.lora.base_dtype)
mc = mc.replace(dtype="bfloat16", remat=False, scan_layers=True, lora_alpha=float(cfg.lora.alpha))
fwd = jax.jit(lambda p, t: jax.nn.log_softmax(qwen2.forward(p, mc, t).astype(jnp.float32), -1))
def logp(q, think):
    msgs = build_messages(q) + [{"role": "assistant", "content": f"<think>{think}</think>",
            "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"query": q}}}]}]
    ids, mask = render_trace(tok, {"messages": msgs, "tools": tools})
    L = 512; assert len(ids) <= L, len(ids); t = np.zeros((1, L), np.int32); t[0, :len(ids)] = ids
    lp = np.asarray(fwd(params, jnp.asarray(t)))[0]
    m = np.array(mask[1:], bool); tg = np.array(ids[1:])
    return int(np.sum(mask)), float(lp[np.arange(len(ids) - 1), tg][m].sum())
by = {}
for r in held_q:
    tpl = question_template(r.question)
    if len(by.setdefault(tpl, [])) >= n:
        continue
    (nl, ll), (nb, lb) = logp(r.question, SEARCH_THINK), logp(r.question, BRIEF_THINK)
    by[tpl].append((nl, 1 / (1 + np.exp(ll - lb))))
for tpl, v in by.items():
    v = np.array(v)
    print(tpl, "n", len(v), "long-think tokens max", int(v[:, 0].max()), "p(brief) mean %.3f min %.3f max %.3f" % (v[:, 1].mean(), v[:, 1].min(), v[:, 1].max()), flush=True)
