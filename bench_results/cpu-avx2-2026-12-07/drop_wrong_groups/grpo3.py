"""GRPO stage (with the demo's pool option) from a demo's SFT checkpoint.  usage: grpo3.py DEMO_DIR OUT key=val..."""
import json, os, sys, time
import numpy as np
from mtr_jax import demo as D
demo_dir, out = sys.argv[1], sys.argv[2]; overrides = sys.argv[3:]
os.makedirs(out, exist_ok=True)
demo, cfg = D.load_real_config(None, overrides, False, out)
from transformers import AutoTokenizer
from mtr_jax.model.hf_io import load_hf_params
from mtr_jax.model.sources import tokenizer_dir
from mtr_jax.train.checkpoint import load_params
from mtr_jax.train.grpo import train_grpo
t0 = time.perf_counter()
train_q, held_q = D.build_world(demo.world)
toolmaker, actor, _, traces, rejected = D.make_traces(cfg, train_q, out)
tok = AutoTokenizer.from_pretrained(tokenizer_dir(demo.model))
_, model_cfg = load_hf_params(demo.model, dtype=cfg.lora.base_dtype)
params, _ = load_params(os.path.join(demo_dir, "sft", "checkpoints"), dtype=cfg.lora.base_dtype)
m = cfg.model
model_cfg = model_cfg.replace(dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers, remat_policy=m.remat_policy,
                              lora_alpha=float(cfg.lora.alpha))
print("load_s", time.perf_counter() - t0, flush=True)
t = time.perf_counter()
probe = None
if os.environ.get("PROBE"):
    probe = [json.loads(l) for l in open(os.environ["PROBE"])]
elif demo.grpo_pool == "probe":
    probe = D.eval_rows(cfg, model_cfg, params, tok, train_q, toolmaker, actor)
    D.write_eval(out, "probe", probe)
    print("probe_s", time.perf_counter() - t, "wrong", [(r["question"], r["end_reason"]) for r in probe if r["em"] < 1], flush=True)
pool = D.grpo_pool(demo.grpo_pool, train_q, probe, seed=cfg.run.seed)
print("pool", len(pool), flush=True)
params = train_grpo(cfg, model_cfg, params, tok, pool, actor, toolmaker, os.path.join(out, "grpo"), progress=False)
print("grpo_s", time.perf_counter() - t, flush=True)
t = time.perf_counter()
rows = D.eval_rows(cfg, model_cfg, params, tok, held_q, toolmaker, actor)
s = D.stage_summary(rows, time.perf_counter() - t)
D.write_eval(out, "grpo", rows)
print("grpo", json.dumps(s), flush=True)
sft = {json.loads(l)["id"]: json.loads(l)["em"] for l in open(os.path.join(demo_dir, "eval_sft.jsonl"))}
diff = np.array([r["em"] - sft[r["id"]] for r in rows])
print("paired", diff.mean(), D.bootstrap_interval(diff), flush=True)
print("total_s", time.perf_counter() - t0, "peak_rss", D.peak_rss_gb(), flush=True)
