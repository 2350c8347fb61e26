"""RSS over time for the demo's GRPO stage (1 step by default) from saved SFT params; phase marks."""
import json, os, pickle, sys, threading, time
import jax, numpy as np
from mtr_jax import demo as D
sftdir, out = sys.argv[1], sys.argv[2]; overrides = sys.argv[3:]
os.makedirs(out, exist_ok=True)
T0 = time.perf_counter()
def rss():
    for l in open("/proc/self/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) / 2**20
def hwm():
    for l in open("/proc/self/status"):
        if l.startswith("VmHWM"): return int(l.split()[1]) / 2**20
log = open(os.path.join(out, "rss.log"), "w")
def mark(s):
    print(f"{time.perf_counter()-T0:8.1f}s rss {rss():.2f} hwm {hwm():.2f} {s}", flush=True)
def sampler():
    while True:
        log.write(f"{time.perf_counter()-T0:.1f} {rss():.3f}\n"); log.flush(); time.sleep(0.5)
threading.Thread(target=sampler, daemon=True).start()
demo, cfg = D.load_real_config(None, ["grpo.steps=1"] + overrides, False, out)
from transformers import AutoTokenizer
from mtr_jax.model import lora
from mtr_jax.model.hf_io import load_hf_params
from mtr_jax.model.sources import tokenizer_dir
from mtr_jax.train import grpo as G
train_q, held_q = D.build_world(demo.world)
toolmaker, actor, _, traces, rejected = D.make_traces(cfg, train_q, out)
tok = AutoTokenizer.from_pretrained(tokenizer_dir(demo.model))
mark("before load")
params, model_cfg = load_hf_params(demo.model, dtype=cfg.lora.base_dtype)
m = cfg.model
model_cfg = model_cfg.replace(dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers, remat_policy=m.remat_policy)
model_cfg = model_cfg.replace(lora_alpha=float(cfg.lora.alpha))
mark("base loaded")
with open(os.path.join(sftdir, "params.pkl"), "rb") as f:
    params = jax.tree_util.tree_map(jax.numpy.asarray, pickle.load(f))
mark("sft params loaded")
orig_roll, orig_upd = G.GRPOTrainer.rollout, G.GRPOTrainer._update
def roll(self, *a, **k):
    mark("rollout start"); r = orig_roll(self, *a, **k); mark("rollout end"); return r
def upd(self, *a, **k):
    mark("update start"); r = orig_upd(self, *a, **k); mark("update end"); return r
G.GRPOTrainer.rollout, G.GRPOTrainer._update = roll, upd
params = G.train_grpo(cfg, model_cfg, params, tok, train_q, actor, toolmaker, os.path.join(out, "grpo"), progress=False)
mark("grpo done")
if os.environ.get("EVAL"):
    rows = D.eval_rows(cfg, model_cfg, params, tok, held_q, toolmaker, actor)
    mark("eval done " + json.dumps(D.stage_summary(rows, 0)))
