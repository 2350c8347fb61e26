"""Peak RSS of the demo's LoRA SFT stage (its first `sft.steps` steps) at the demo's shapes."""
import os, sys, time
import jax
from mtr_jax import demo as D
out = sys.argv[1]; overrides = sys.argv[2:]
os.makedirs(out, exist_ok=True)
T0 = time.perf_counter()
def hwm():
    for l in open("/proc/self/status"):
        if l.startswith("VmHWM"): return int(l.split()[1]) / 2**20
demo, cfg = D.load_real_config(None, overrides, False, out)
from transformers import AutoTokenizer
from mtr_jax.model import lora
from mtr_jax.model.hf_io import load_hf_params
from mtr_jax.model.sources import tokenizer_dir
from mtr_jax.train.sft import train_sft, traces_to_examples
train_q, held_q = D.build_world(demo.world)
toolmaker, actor, _, traces, rejected = D.make_traces(cfg, train_q, out)
tok = AutoTokenizer.from_pretrained(tokenizer_dir(demo.model))
params, model_cfg = load_hf_params(demo.model, dtype=cfg.lora.base_dtype)
m = cfg.model
model_cfg = model_cfg.replace(dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers, remat_policy=m.remat_policy)
model_cfg = model_cfg.replace(lora_alpha=float(cfg.lora.alpha))
token_ids = lora.resolve_tokens(cfg.lora, tok)
params = lora.init_rows_from_pieces(params, tok, token_ids)
examples, dropped = traces_to_examples(tok, traces, cfg.sft.seq_len)
print(f"{time.perf_counter()-T0:.0f}s loaded, hwm {hwm():.2f}", flush=True)
t = time.perf_counter()
params, _ = train_sft(cfg, model_cfg, params, examples, os.path.join(out, "sft"), progress=False, token_ids=token_ids)
print(f"sft {time.perf_counter()-t:.0f}s hwm {hwm():.2f} GiB", flush=True)
