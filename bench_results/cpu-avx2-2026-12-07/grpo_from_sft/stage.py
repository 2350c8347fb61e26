"""Experiment: demo stages with saved SFT params.  usage: stage.py sft OUT | stage.py grpo SFTDIR OUT key=val..."""
import json, os, pickle, sys, time
import jax, numpy as np
from mtr_jax import demo as D

mode = sys.argv[1]
if mode == "sft":
    out = sys.argv[2]; overrides = sys.argv[3:]
else:
    sftdir, out = sys.argv[2], sys.argv[3]; overrides = sys.argv[4:]
os.makedirs(out, exist_ok=True)
demo, cfg = D.load_real_config(None, overrides, False, out)
from transformers import AutoTokenizer
from mtr_jax.model import lora
from mtr_jax.model.hf_io import load_hf_params
from mtr_jax.model.sources import tokenizer_dir
from mtr_jax.train.grpo import train_grpo
from mtr_jax.train.sft import train_sft, traces_to_examples
t0 = time.perf_counter()
train_q, held_q = D.build_world(demo.world)
toolmaker, actor, _, traces, rejected = D.make_traces(cfg, train_q, out)
tok = AutoTokenizer.from_pretrained(tokenizer_dir(demo.model))
params, model_cfg = load_hf_params(demo.model, dtype=cfg.lora.base_dtype)
m = cfg.model
model_cfg = model_cfg.replace(dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers, remat_policy=m.remat_policy)
model_cfg = model_cfg.replace(lora_alpha=float(cfg.lora.alpha))
token_ids = lora.resolve_tokens(cfg.lora, tok)
def ev(stage, p):
    t = time.perf_counter()
    rows = D.eval_rows(cfg, model_cfg, p, tok, held_q, toolmaker, actor)
    s = D.stage_summary(rows, time.perf_counter() - t)
    D.write_eval(out, stage, rows)
    print(stage, json.dumps(s), flush=True)
    return rows
if mode == "sft":
    if cfg.lora.token_init == "pieces":
        params = lora.init_rows_from_pieces(params, tok, token_ids)
    examples, dropped = traces_to_examples(tok, traces, cfg.sft.seq_len)
    t = time.perf_counter()
    params, _ = train_sft(cfg, model_cfg, params, examples, os.path.join(out, "sft"), progress=False, token_ids=token_ids)
    print("sft_s", time.perf_counter() - t, flush=True)
    with open(os.path.join(out, "params.pkl"), "wb") as f:
        pickle.dump(jax.device_get(params), f)
    ev("sft", params)
elif mode == "evalonly":
    with open(os.path.join(sftdir, "params.pkl"), "rb") as f:
        params = jax.tree_util.tree_map(jax.numpy.asarray, pickle.load(f))
    ev("sft", params)
else:
    with open(os.path.join(sftdir, "params.pkl"), "rb") as f:
        params = jax.tree_util.tree_map(jax.numpy.asarray, pickle.load(f))
    t = time.perf_counter()
    params = train_grpo(cfg, model_cfg, params, tok, train_q, actor, toolmaker, os.path.join(out, "grpo"), progress=False)
    print("grpo_s", time.perf_counter() - t, flush=True)
    rows = ev("grpo", params)
    sft = {json.loads(l)["id"]: json.loads(l)["em"] for l in open(os.path.join(sftdir, "eval_sft.jsonl"))}
    diff = np.array([r["em"] - sft[r["id"]] for r in rows])
    print("paired", diff.mean(), D.bootstrap_interval(diff), flush=True)
print("total_s", time.perf_counter() - t0, "peak_rss", D.peak_rss_gb(), flush=True)
