"""log p(first turn) of full-question vs keyword search under a demo's SFT params, for the person -> country
questions. p(kw) = p_kw / (p_kw + p_full) of the two whole first turns; tokens counts the turn's loss-masked
tokens (its text + <|im_end|>), against the 48-token budget.
usage: python first_turn_logp.py DEMO_DIR tools.keyword_query_rate=0.3  (output: first_turn_logp.txt)"""
import json, os, sys, time
import numpy as np, jax, jax.numpy as jnp
from mtr_jax import demo as D
from mtr_jax.tools.autoagent import keyword_query, question_template
from mtr_jax.traces.render import render_trace, build_messages
demo_dir = sys.argv[1]
demo, cfg = D.load_real_config(None, sys.argv[2:], False, "/tmp/s13/x")
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
def turn(q, query):
    msgs = build_messages(q) + [{"role": "assistant", "content": "<think>I will search for the key facts in the question.</think>",
            "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"query": query}}}]}]
    ids, mask = render_trace(tok, {"messages": msgs, "tools": tools})
    return ids, mask
for name, qs in (("train", train_q), ("held", held_q)):
    out = []
    for r in [r for r in qs if r.question.startswith("In which country")]:
        row = []
        for query in (r.question, keyword_query(r.question)):
            ids, mask = turn(r.question, query)
            L = 512; assert len(ids) <= L, len(ids); t = np.zeros((1, L), np.int32); t[0, :len(ids)] = ids
            lp = np.asarray(fwd(params, jnp.asarray(t)))[0]
            m = np.array(mask[1:], bool); tg = np.array(ids[1:])
            s = lp[np.arange(len(ids) - 1), tg][m].sum()
            row.append((int(np.sum(mask)), float(s)))
        out.append((question_template(r.question), row))
    by = {}
    for tpl, ((nf, lf), (nk, lk)) in out:
        by.setdefault(tpl, []).append((nf, nk, lf - lk))
    for tpl, v in by.items():
        v = np.array(v)
        print(name, tpl, "lens", int(v[:,0].min()), int(v[:,0].max()), "n", len(v), "full_tokens>48:", int((v[:, 0] > 48).sum()), "kw_tokens>48:", int((v[:, 1] > 48).sum()),
              "p(kw) mean %.3f" % np.mean(1 / (1 + np.exp(v[:, 2]))), "long p(kw) %s" % np.round(1 / (1 + np.exp(v[v[:, 0] > 48, 2])), 3), flush=True)
