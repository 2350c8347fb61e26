"""Demo SFT probe: the demo's world, traces and SFT with experimental switches, then teacher-forced
accuracy on held-out oracle traces and (optionally) the demo's greedy held-out EM.

    python scripts/demo_research/sft_probe.py --out /tmp/probe [--plant 1 --s 10] [--tool_loss 1]
        [--n_train 1200 --scale 3] [--split_space 1] [--quote 1|2] [sft.optim.lr=1e-3 ...]

It prints token accuracy, the share of held-out traces whose every token of assistant turn k is
right under teacher forcing, and the first mispredicted tokens with their context.
"""
import argparse, json, os, time, random, re, sys
import numpy as np, jax, jax.numpy as jnp
from mtr_jax.demo import load_demo_config, sibling_tokenizer, _eval, _round_up
from mtr_jax.data.synthetic import make_world, split_world
from mtr_jax.model import qwen2
from mtr_jax.tools.autoagent import AutoAgent
from mtr_jax.tools.toolactor import ToolActor
from mtr_jax.tools.toolmaker import ToolMaker
from mtr_jax.train.sft import train_sft, traces_to_examples
from mtr_jax.train import losses

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="/tmp/sft_probe")
ap.add_argument("--tool_loss", type=int, default=0)      # 1: loss on tool-response tokens too
ap.add_argument("--n_train", type=int, default=400)
ap.add_argument("--scale", type=float, default=1.0)      # world size multiplier
ap.add_argument("--greedy", type=int, default=1); ap.add_argument("--plant", type=int, default=0); ap.add_argument("--delta", type=float, default=4.0); ap.add_argument("--emb_std", type=float, default=0.5); ap.add_argument("--fnorm", type=float, default=0.04); ap.add_argument("--match", type=float, default=30.0); ap.add_argument("--s", type=float, default=4.0)
ap.add_argument("--split_space", type=int, default=0)
ap.add_argument("--quote", type=int, default=0)  # 1: thinks quote the retrieved sentence; "born in the year 1960"
ap.add_argument("overrides", nargs="*")
a = ap.parse_args()
t0 = time.perf_counter()
if a.split_space:
    import mtr_jax.data.demo_tokenizer as dt
    dt.QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
if a.quote:
    import mtr_jax.data.synthetic as syn
    import mtr_jax.tools.autoagent as aa
    _orig_build = syn.World._build_pages
    def _build(self):
        out = _orig_build(self)
        for p in out:
            p.sentences = [re.sub(r" was born in (\d{4})\.", r" was born in the year \1.", x) for x in p.sentences]
        return out
    syn.World._build_pages = _build
    def _sentence_naming(ep, name):
        for o in ep.obs_dicts:
            for r in o.get("results", []) if isinstance(o, dict) else []:
                for x in re.split(r"(?<=[.!?])\s+", r.get("text", "")):
                    if name in x and r.get("title") != name:
                        return x
        return ""
    def _plan(self, ep):
        r = ep.record
        ep.call("I will search for the key facts in the question.", "search", {"query": aa._clip(r.question, 300)})
        for title in list(dict.fromkeys(t for t, _ in r.supporting)):
            if ep.n_calls >= self.max_calls:
                break
            sents = [p for p in r.context if p.title == title]
            idx = [i for t, i in r.supporting if t == title]
            if sents and all(i < len(sents[0].sentences) and ep.seen(sents[0].sentences[i]) for i in idx):
                continue
            q = _sentence_naming(ep, title)
            if a.quote == 2 and q:  # the name follows the same words as in the tool result: induction can copy it
                q = re.sub(r"^.*? (is|was) ", r"It \1 ", q, count=1)
            ep.call(f"{q} I will look it up." if q else f"I also need facts about {title}. I will look it up.", "lookup", {"title": title})
    aa.AutoAgent._plan_supporting = _plan
    _orig_ev = aa._Episode.evidence_for
    aa._Episode.evidence_for = lambda self, ans: _orig_ev(self, ans).split(": ", 1)[-1]
    if a.quote == 2:
        aa._Episode.evidence_for = lambda self, ans: re.sub(r"^.*? (is|was) ", r"It \1 ", _orig_ev(self, ans).split(": ", 1)[-1], count=1)
        _orig_finish = aa.AutoAgent._finish
        def _finish(self, ep):
            ep, answer, why = _orig_finish(self, ep)
            if ep.messages and ep.messages[-1]["role"] == "assistant":
                ep.messages[-1]["content"] = ep.messages[-1]["content"].replace(f" So the answer is {answer}.", "")
            return ep, answer, why
        aa.AutoAgent._finish = _finish
demo, cfg = load_demo_config(None, [f"world.n_train={a.n_train}"] + a.overrides, False, a.out)
w = demo.world
world = make_world(seed=w.seed, n_people=int(w.n_people*a.scale), n_cities=int(w.n_cities*a.scale), n_films=int(w.n_films*a.scale), n_companies=int(w.n_companies*a.scale))
train_q, held_q = split_world(world, n_train=w.n_train, n_heldout=w.n_heldout, seed=w.seed, kinds=w.kinds or None)
os.makedirs(a.out, exist_ok=True)
tm = ToolMaker(backend="template")
cfg.tools.cache = os.path.join(a.out, "tool_cache.sqlite")
actor = ToolActor.from_config(cfg.tools, cfg.tools.cache)
agent = AutoAgent(backend="oracle", actor=actor, keep_metric=cfg.tools.keep_metric, keep_threshold=cfg.tools.keep_threshold)
traces = [t for t in (agent.make_trace(r, tm.make(r))[0] for r in train_q) if t is not None]
held_traces = [t for t in (agent.make_trace(r, tm.make(r))[0] for r in held_q) if t is not None]
tok = sibling_tokenizer(w, tm, agent)
arch = dict(demo.arch)
if a.plant: arch["rope_theta"] = 1e6
model_cfg = qwen2.Qwen2Config(vocab_size=_round_up(len(tok), 64), eos_token_id=tok.eos_token_id, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, **arch)
params = qwen2.init_params(model_cfg, jax.random.PRNGKey(cfg.run.seed))
if a.plant:
    sys.path.insert(0, os.path.dirname(__file__))
    from copy_ready_init import plant_copy
    params = plant_copy(params, model_cfg, match=a.match, delta=a.delta, emb_std=a.emb_std*a.s, final_norm=a.fnorm/a.s, s=a.s)
examples, _ = traces_to_examples(tok, traces, cfg.sft.seq_len)
def with_tool(ex):
    ids, m = ex
    first = int(np.argmax(m))
    obs = np.zeros_like(m); obs[first:] = 1
    return ids, np.maximum(m, obs).astype(np.int32)
if a.tool_loss:
    examples = [with_tool(e) for e in examples]
held_ex, _ = traces_to_examples(tok, held_traces, 1024)
print(f"setup {time.perf_counter()-t0:.0f}s; {len(examples)} train traces, {len(held_ex)} held", flush=True)

L = cfg.sft.seq_len
@jax.jit
def tf(p, toks):
    logits = qwen2.forward(p, model_cfg, toks)
    return jnp.argmax(logits, -1)
def tf_eval(p, dump=None):
    accs, ans, turn_ok = [], [], {}
    for i in range(0, len(held_ex), 25):
        chunk = held_ex[i:i+25]
        toks = np.zeros((25, L), np.int32); msk = np.zeros((25, L), np.int32)
        for j, (ids, m) in enumerate(chunk):
            toks[j, :len(ids)] = ids; msk[j, :len(ids)] = m
        pred = np.asarray(tf(p, toks))
        ok = (pred[:, :-1] == toks[:, 1:]) | (msk[:, 1:] == 0)
        for j, (ids, m) in enumerate(chunk):
            mm = m[1:] == 1
            accs.append(ok[j][:len(ids)-1][mm[:len(ids)-1]].mean())
            # last assistant turn all right
            idx = np.where(mm)[0]; last = idx[idx > idx.max() - 25]
            ans.append(ok[j][last].all())
            # per assistant turn: all of its tokens right (turns = runs of masked positions)
            runs = np.split(idx, np.where(np.diff(idx) > 1)[0] + 1)
            for t, r in enumerate(runs[:4]):
                turn_ok.setdefault(t, []).append(ok[j][r].all())
            if dump is not None and len(dump) < 40:
                for q in idx[~ok[j][idx]][:3]:
                    dump.append((tok.decode(ids[max(0, q - 12):q + 1]), tok.decode([int(pred[j, q])]), tok.decode([ids[q + 1]])))
    print("  per-turn all right:", {t: round(float(np.mean(v)), 3) for t, v in turn_ok.items()}, flush=True)
    if dump:
        for ctx, got, want in dump[:40]:
            print(f"    ...{ctx!r} -> got {got!r} want {want!r}")
    return float(np.mean(accs)), float(np.mean(ans))
print("untrained tf", tf_eval(params), flush=True)
t1 = time.perf_counter()
params, m = train_sft(cfg, model_cfg, params, examples, os.path.join(a.out, "sft"), progress=False)
t2 = time.perf_counter()
print(f"sft {t2-t1:.0f}s loss {float(m['loss']):.3f} tf(acc, lastturn) {tf_eval(params, dump=[])}", flush=True)
if a.greedy:
    from mtr_jax.eval import summarize
    rows = _eval(cfg, model_cfg, params, tok, held_q, tm, actor)
    s = summarize(rows)
    print(f"greedy EM {s['em']:.3f} F1 {s['f1']:.3f} ({time.perf_counter()-t2:.0f}s)", flush=True)
    with open(os.path.join(a.out, "eval.jsonl"), "w") as f:
        for r in rows: f.write(json.dumps(r) + "\n")
