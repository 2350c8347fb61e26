"""Compile the demo's GRPO update step at a given shape; print XLA's memory analysis (no run)."""
import os, sys, time
import jax, numpy as np
from mtr_jax import demo as D
P, C = int(sys.argv[1]), int(sys.argv[2]); overrides = sys.argv[3:]
demo, cfg = D.load_real_config(None, overrides, False, "/tmp/exp/mc")
from transformers import AutoTokenizer
from mtr_jax.model.hf_io import load_hf_params
from mtr_jax.model.sources import tokenizer_dir
from mtr_jax.train import grpo as G
from mtr_jax.train.step import split_micro
train_q, held_q = D.build_world(demo.world)
tok = AutoTokenizer.from_pretrained(tokenizer_dir(demo.model))
params, model_cfg = load_hf_params(demo.model, dtype=cfg.lora.base_dtype)
m = cfg.model
model_cfg = model_cfg.replace(dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers, remat_policy=m.remat_policy)
model_cfg = model_cfg.replace(lora_alpha=float(cfg.lora.alpha))
tr = G.GRPOTrainer(cfg, model_cfg, params, tok, train_q, None, None)
g = cfg.grpo
groups, rows = g.batch_size, g.batch_size * g.group_size
rng = np.random.RandomState(0)
data = {"prompts": rng.randint(0, 1000, (groups, P)).astype(np.int32), "prompt_lens": np.full(groups, P - 7, np.int32),
        "completions": rng.randint(0, 1000, (rows, C)).astype(np.int32), "mask": np.ones((rows, C), np.float32),
        "sampler_logp": np.zeros((rows, C), np.float32), "episode": np.ones(rows, np.float32),
        "old_logp": np.zeros((rows, C), np.float32), "ref_logp": np.zeros((rows, C), np.float32),
        "adv": rng.normal(size=rows).astype(np.float32)}
mb = split_micro(data, g.grad_accum)
t = time.perf_counter()
comp = tr.step_fn.lower(tr.params, tr.opt_state, mb, *tr.frozen).compile()
ma = comp.memory_analysis()
GB = 2**30
print(f"P={P} C={C} {' '.join(overrides)} compile {time.perf_counter()-t:.0f}s  temp {ma.temp_size_in_bytes/GB:.2f} GiB  "
      f"args {ma.argument_size_in_bytes/GB:.2f}  out {ma.output_size_in_bytes/GB:.2f}  alias {ma.alias_size_in_bytes/GB:.2f}", flush=True)
if os.environ.get("RUN"):
    def rss():
        for l in open("/proc/self/status"):
            if l.startswith("VmHWM"): return int(l.split()[1]) / 2**20
    print("hwm before run", rss())
    out = comp(tr.params, tr.opt_state, mb, *tr.frozen); jax.block_until_ready(out)
    print("hwm after run", rss())
