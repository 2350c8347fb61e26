"""Is the new chunked-head backward (custom_vjp, 598c3dd) a different GRPO-style gradient from the old
one (AD of the remat'd scan, fdf5ad8)? Real Qwen2.5-0.5B + the demo's SFT LoRA params, bf16 compute;
reference: the same loss in float32 through the dense head."""
import json, pickle, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "/tmp/exp")
import old_losses
from mtr_jax.train import losses
from mtr_jax.model import qwen2, lora
from mtr_jax.model.hf_io import load_hf_params
from mtr_jax.model.sources import tokenizer_dir
from mtr_jax.train.sft import traces_to_examples
from transformers import AutoTokenizer
M = "offline:qwen2.5-coder-0.5b-instruct"
tok = AutoTokenizer.from_pretrained(tokenizer_dir(M))
_, mcfg = load_hf_params(M, dtype="bfloat16")
p = jax.tree_util.tree_map(jnp.asarray, pickle.load(open("/tmp/exp/sft/params.pkl", "rb")))
base, ad = lora.split_adapters(p)
traces = [json.loads(l) for l in open("/tmp/exp/sft/traces.jsonl")][:4]
ex, _ = traces_to_examples(tok, traces, 768)
T = max(len(e[0]) for e in ex)
toks = np.zeros((len(ex), T), np.int32); mask = np.zeros((len(ex), T), np.float32); seg = np.zeros_like(toks)
for i, (ids, m) in enumerate(ex):
    toks[i, :len(ids)] = ids; mask[i, :len(ids)] = m; seg[i, :len(ids)] = 1
pos = np.tile(np.arange(T, dtype=np.int32), (len(ex), 1))
adv = np.array([1.0, -1.5, 0.5, 0.0][:len(ex)], np.float32)
print("rows", len(ex), "T", T, "loss tokens", mask[:, 1:].sum())

def make_loss(cfg, head):
    def f(adapters):
        params = dict(base, layers={**base["layers"], **adapters["layers"]})
        h = qwen2.hidden_states(params, cfg, toks, pos, seg)[:, :-1]
        lp, ent = head(params, cfg, h, toks[:, 1:])
        m = mask[:, 1:]
        return -(lp * m * adv[:, None]).sum() / m.sum() + 0.01 * (ent * m).sum() / m.sum()
    return jax.jit(jax.value_and_grad(f))

cfg_bf = mcfg.replace(dtype="bfloat16", remat=True, scan_layers=True, lora_alpha=32.0)
cfg_32 = mcfg.replace(dtype="float32", remat=True, scan_layers=True, lora_alpha=32.0)
def dense_head(params, cfg, h, tgt):
    x = qwen2.rms_norm(h, params["final_norm"], cfg.rms_norm_eps).astype(jnp.float32)
    logits = jnp.einsum("bte,ev->btv", x, params["lm_head"].astype(jnp.float32), precision="highest")
    return losses._logp_entropy(logits, tgt, 1.0)
res = {}
import os
if os.environ.get("REORDER_CHECK"):
    v, g = make_loss(cfg_bf, losses.head_logp_entropy)(ad)
    res["reordered"] = (float(v), np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(g)]))
    qwen2._lhs_contracting_last = lambda spec, a, b: (spec, a, b)
    v, g = make_loss(cfg_bf, losses.head_logp_entropy)(ad)
    res["as_written"] = (float(v), np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(g)]))
for name, cfg, head in [] if os.environ.get("REORDER_CHECK") else [("new_bf16", cfg_bf, losses.head_logp_entropy), ("old_bf16", cfg_bf, old_losses.head_logp_entropy),
                        ("ref_f32", cfg_32, dense_head)]:
    v, g = make_loss(cfg, head)(ad)
    res[name] = (float(v), np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(g)]))
    print(name, "loss", res[name][0], "|g|", np.linalg.norm(res[name][1]), flush=True)
def cmp(a, b):
    x, y = res[a][1], res[b][1]
    cos = x @ y / np.linalg.norm(x) / np.linalg.norm(y)
    rel = np.linalg.norm(x - y) / np.linalg.norm(y)
    # Adam's first step is lr * sign(g): the fraction of parameters whose step direction differs
    flip = np.mean(np.sign(x) != np.sign(y))
    print(f"{a} vs {b}: cos {cos:.6f}  rel err {rel:.4f}  sign flips {flip:.4f}")
if "reordered" in res:
    v, g = make_loss(cfg_32, dense_head)(ad)
    res["ref_f32"] = (float(v), np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(g)]))
    for k, (v, g) in res.items(): print(k, "loss", v, "|g|", np.linalg.norm(g))
    cmp("reordered", "as_written"); cmp("reordered", "ref_f32"); cmp("as_written", "ref_f32"); sys.exit()
cmp("new_bf16", "old_bf16"); cmp("new_bf16", "ref_f32"); cmp("old_bf16", "ref_f32")
