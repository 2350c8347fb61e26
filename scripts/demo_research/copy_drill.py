"""Copy drill: how fast does the demo's tiny Qwen2 learn to copy names it has never seen?

Rows are "Names: A, B, C. Again: A, B, C." (names from the world generator's syllables; the test
names are disjoint from the training names); loss on the repeat. Prints held-out token accuracy
every 25 steps. `--plant 9` starts from the copy-ready init (copy_ready_init.py).

    python scripts/demo_research/copy_drill.py --tokenizer RUN/tokenizer --steps 200 --bs 8 --T 64 \
        --plant 9 --theta 1e6 --match 30 --lr 3e-3 --emb_std 0.5 --fnorm 0.04 --delta 4 --s 10
"""
import sys, time, random, argparse
import numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, __import__("os").path.dirname(__file__))
from transformers import AutoTokenizer
from mtr_jax.data.synthetic import _name_gen
from mtr_jax.model import qwen2
from mtr_jax.train import losses
from mtr_jax.train.step import make_train_step
from mtr_jax.train.optim import make_optimizer
from mtr_jax.config import Config
ap = argparse.ArgumentParser()
ap.add_argument("--tokenizer", required=True, help="a demo run's tokenizer/ folder"); ap.add_argument("--steps", type=int, default=300); ap.add_argument("--bs", type=int, default=32)
ap.add_argument("--T", type=int, default=128); ap.add_argument("--lr", type=float, default=3e-3)
ap.add_argument("--hidden", type=int, default=128); ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--heads", type=int, default=4); ap.add_argument("--kv", type=int, default=2)
ap.add_argument("--offset", type=int, default=0); ap.add_argument("--dtype", default="bfloat16"); ap.add_argument("--plant", type=int, default=0); ap.add_argument("--match", type=float, default=8.0); ap.add_argument("--alpha", type=float, default=1.0); ap.add_argument("--delta", type=float, default=1.0); ap.add_argument("--emb_std", type=float, default=0.02); ap.add_argument("--fnorm", type=float, default=1.0); ap.add_argument("--s", type=float, default=1.0); ap.add_argument("--theta", type=float, default=10000.0); ap.add_argument("--margin", type=float, default=10.0)
a = ap.parse_args()
tok = AutoTokenizer.from_pretrained(a.tokenizer)
tr_word = _name_gen(random.Random(1)); te_word = _name_gen(random.Random(2))
def name(word, rng): return f"{word(2)} {word(rng.choice([1,2]))}" if rng.random() < 0.5 else word(rng.choice([2,3]))
train_names = [name(tr_word, random.Random(i)) for i in range(3000)]
test_names = [name(te_word, random.Random(10**6+i)) for i in range(300)]
test_names = [n for n in test_names if n not in set(train_names)]
def row(names, rng, T):
    k = rng.randint(2, 5); ns = rng.sample(names, k)
    a_ids = tok("Names: " + ", ".join(ns) + ".")["input_ids"]
    b_ids = tok(" Again: " + ", ".join(ns) + ".")["input_ids"]
    ids = a_ids + b_ids; m = [0]*len(a_ids) + [0, 0] + [1]*(len(b_ids)-2)
    return ids[:T], m[:T]
def batch(names, rng, bs, T):
    toks = np.zeros((bs, T), np.int32); msk = np.zeros((bs, T), np.int32); seg = np.zeros((bs, T), np.int32); pos = np.zeros((bs, T), np.int32)
    for j in range(bs):
        ids, m = row(names, rng, T); n = len(ids)
        toks[j, :n] = ids; msk[j, :n] = m; seg[j, :n] = 1
        off = rng.randint(0, a.offset) if a.offset else 0
        pos[j] = np.arange(T) + off
    return {"tokens": toks, "loss_mask": msk, "segment_ids": seg, "positions": pos}
cfg = Config(); cfg.sft.optim.lr = a.lr; cfg.sft.optim.warmup_steps = 20; cfg.sft.optim.weight_decay = 0.0
mc = qwen2.Qwen2Config(vocab_size=1600, eos_token_id=0, dtype=a.dtype, param_dtype="float32", hidden_size=a.hidden, intermediate_size=3*a.hidden,
    num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv, max_position_embeddings=1024, rope_theta=a.theta, tie_word_embeddings=True)
params = qwen2.init_params(mc, jax.random.PRNGKey(0))
if a.plant == 9:
    from copy_ready_init import plant_copy
    params = plant_copy(params, mc, match=a.match, alpha=a.alpha, delta=a.delta, emb_std=a.emb_std*a.s, final_norm=a.fnorm/a.s, s=a.s)
elif a.plant:
    raise SystemExit('--plant 9 is the only planted init kept')
tx, _ = make_optimizer(cfg.sft.optim, a.steps)
opt = tx.init(params)
step = make_train_step(lambda p, mb: (lambda n, d: (n, {"tokens": d}))(*losses.sft_loss_num(p, mc, mb)), losses.sft_denominator, tx)
@jax.jit
def acc(p, b):
    pred = jnp.argmax(qwen2.forward(p, mc, b["tokens"], b["positions"], b["segment_ids"]), -1)[:, :-1]
    ok = (pred == b["tokens"][:, 1:]); m = b["loss_mask"][:, 1:] == 1
    tok_acc = jnp.sum(ok & m) / jnp.sum(m)
    row_ok = jnp.all(ok | ~m, axis=1)
    return tok_acc, losses.sft_loss_num(p, mc, b)[0] / jnp.sum(m)
rng = random.Random(0); te = batch(test_names, random.Random(5), 256, a.T)
t0 = time.perf_counter()
ta, ra = acc(params, te); print(f"init test tok_acc {float(ta):.3f} loss {float(ra):.3f}", flush=True)
for s in range(1, a.steps+1):
    b = batch(train_names, rng, a.bs, a.T)
    params, opt, m = step(params, opt, {k: v[None] for k, v in b.items()})
    if s % 25 == 0:
        ta, ra = acc(params, te)
        print(f"step {s} loss {float(m['loss']):.3f} test tok_acc {float(ta):.3f} test_loss {float(ra):.3f} t {time.perf_counter()-t0:.0f}s", flush=True)
