"""SFT and GRPO trainers: learning, exact resume after SIGKILL, sharded == single device, bad input."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from util import REPO, run_with_devices

# ------------------------------------------------------------------------------------------------
# A tiny SFT setting shared by the tests (and by the subprocesses below, as source text).

SFT_SETUP = """
import jax, numpy as np
from mtr_jax.config import load_config
from mtr_jax.model import qwen2
from mtr_jax.train.sft import train_sft

def sft_setting(run_dir, steps=8, extra=()):
    cfg = load_config(None, [f"sft.steps={steps}", "sft.batch_size=4", "sft.seq_len=64", "sft.grad_accum=2",
                             "sft.optim.lr=3e-3", "sft.optim.warmup_steps=2", "run.checkpoint_every=2",
                             f"run.out_dir={run_dir}", *extra])
    mc = qwen2.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    rng = np.random.RandomState(0)
    examples = []
    for i in range(12):
        n = int(rng.randint(12, 30))
        ids = rng.randint(3, 128, n).astype(np.int32)
        mask = np.zeros(n, np.int32); mask[n // 2:] = 1   # second half = "assistant"
        examples.append((ids, mask))
    params = qwen2.init_params(mc, jax.random.PRNGKey(0))
    return cfg, mc, params, examples
"""
exec(SFT_SETUP)


def _flat(p):
    return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree_util.tree_leaves(p)])


def test_sft_drives_loss_near_zero(tmp_path):
    cfg, mc, params, examples = sft_setting(str(tmp_path), steps=250, extra=["run.checkpoint_every=1000", "sft.grad_accum=1"])
    examples = examples[:4]  # a fixed set of 4 traces, memorised
    _, m = train_sft(cfg, mc, params, examples, str(tmp_path), progress=False)
    assert float(m["loss"]) < 0.05, m
    first = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert first["loss"] > 3.0  # it started from chance (log 128 = 4.85)


def test_sft_loss_ignores_non_assistant_tokens():
    from mtr_jax.train import losses

    cfg, mc, params, examples = sft_setting("/tmp/unused")
    ids, mask = examples[0]
    n = len(ids)
    mask = np.zeros(n, np.int32)
    mask[4:10] = 1  # assistant tokens 4..9, everything after is a later user turn
    def batch(tokens):
        return dict(tokens=tokens[None], loss_mask=mask[None], segment_ids=np.ones((1, n), np.int32),
                    positions=np.arange(n, dtype=np.int32)[None])
    base = float(losses.sft_loss_num(params, mc, batch(ids))[0])
    changed = ids.copy()
    changed[10:] = (changed[10:] + 7) % 128  # non-assistant tokens after the turn
    assert float(losses.sft_loss_num(params, mc, batch(changed))[0]) == base
    changed = ids.copy()
    changed[6] = (changed[6] + 7) % 128  # an assistant token: the loss must move
    assert float(losses.sft_loss_num(params, mc, batch(changed))[0]) != base


def _run_py(code, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_sft_sigkill_and_resume_is_bitwise_equal(tmp_path):
    full = tmp_path / "full"
    cut = tmp_path / "cut"
    cfg, mc, params, examples = sft_setting(str(full))
    want, _ = train_sft(cfg, mc, params, examples, str(full), progress=False)
    # a run killed with SIGKILL after step 5 (its last checkpoint is step 4)
    proc = _run_py(SFT_SETUP + f"""
import os, signal
cfg, mc, params, examples = sft_setting({str(cut)!r})
train_sft(cfg, mc, params, examples, {str(cut)!r}, progress=False, stop_after=5)
os.kill(os.getpid(), signal.SIGKILL)
""")
    assert proc.returncode == -9, proc.stderr[-2000:]
    cfg, mc, params, examples = sft_setting(str(cut))
    got, _ = train_sft(cfg, mc, params, examples, str(cut), resume=True, progress=False)
    assert np.array_equal(_flat(got), _flat(want))
    steps = [json.loads(l)["step"] for l in open(cut / "metrics.jsonl")]
    assert steps == list(range(1, 9))  # every step logged once, the lost step 5 redone


def test_grad_accumulation_split_does_not_change_the_step(tmp_path):
    a_cfg, mc, params, examples = sft_setting(str(tmp_path / "a"), steps=1, extra=["sft.grad_accum=1"])
    b_cfg, *_ = sft_setting(str(tmp_path / "b"), steps=1, extra=["sft.grad_accum=4"])
    pa, ma = train_sft(a_cfg, mc, params, examples, str(tmp_path / "a"), progress=False)
    pb, mb = train_sft(b_cfg, mc, qwen2.init_params(mc, jax.random.PRNGKey(0)), examples, str(tmp_path / "b"), progress=False)
    assert abs(float(ma["loss"]) - float(mb["loss"])) < 1e-6
    np.testing.assert_allclose(_flat(pa), _flat(pb), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# GRPO

GRPO_SETUP = """
import jax, numpy as np
from mtr_jax.config import load_config, ToolsConfig
from mtr_jax.data.demo_tokenizer import demo_tokenizer_for_world
from mtr_jax.data.synthetic import make_world, split_world
from mtr_jax.model import qwen2
from mtr_jax.tools.toolactor import ToolActor
from mtr_jax.tools.toolmaker import ToolMaker
from mtr_jax.train.grpo import train_grpo

def grpo_setting(run_dir, steps=4, extra=()):
    cfg = load_config(None, [f"grpo.steps={steps}", "grpo.batch_size=2", "grpo.group_size=2", "grpo.max_turns=2",
                             "grpo.max_new_tokens=8", "grpo.max_len=768", "grpo.beta=0.05", "grpo.mu=2",
                             "grpo.minibatches=2", "grpo.optim.lr=1e-3", "run.checkpoint_every=2",
                             f"run.out_dir={run_dir}", *extra])
    w = make_world(seed=0)
    train, _ = split_world(w, n_train=6, n_heldout=2, seed=0)
    tok = demo_tokenizer_for_world(w)
    mc = qwen2.Qwen2Config(vocab_size=(len(tok) + 63) // 64 * 64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    params = qwen2.init_params(mc, jax.random.PRNGKey(0))
    actor = ToolActor.from_config(ToolsConfig(), run_dir + "_cache.sqlite")
    return cfg, mc, params, tok, train, actor, ToolMaker("template")
"""
exec(GRPO_SETUP)


def test_grpo_sigkill_and_resume_is_bitwise_equal(tmp_path):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    cfg, mc, params, tok, train, actor, tm = grpo_setting(full)
    want = train_grpo(cfg, mc, params, tok, train, actor, tm, full, progress=False)
    proc = _run_py(GRPO_SETUP + f"""
import os, signal
cfg, mc, params, tok, train, actor, tm = grpo_setting({cut!r})
train_grpo(cfg, mc, params, tok, train, actor, tm, {cut!r}, progress=False, stop_after=3)
os.kill(os.getpid(), signal.SIGKILL)
""")
    assert proc.returncode == -9, proc.stderr[-3000:]
    cfg, mc, params, tok, train, actor, tm = grpo_setting(cut)
    got = train_grpo(cfg, mc, params, tok, train, actor, tm, cut, resume=True, progress=False)
    assert np.array_equal(_flat(got), _flat(want))
    rows = [json.loads(l) for l in open(os.path.join(cut, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("reward", "reward/format_ok", "em", "kl", "entropy", "clip_frac", "response_len", "turns",
                "tool_calls", "invalid_call_rate", "rollout_s", "update_s", "logprob_gap", "grad_norm", "loss"):
        assert key in rows[-1], key
    # old log-probs recomputed by the trainer agree with the sampler's
    assert all(r["logprob_gap"] < 1e-4 for r in rows)


def test_sft_and_grpo_steps_sharded_equal_single_device():
    out = run_with_devices('''
import jax, numpy as np, jax.numpy as jnp
from mtr_jax.model import qwen2
from mtr_jax.parallel.mesh import make_mesh
from mtr_jax.parallel.rules import param_shardings, batch_sharding
from mtr_jax.config import GRPOConfig, OptimConfig
from mtr_jax.train import losses
from mtr_jax.train.optim import make_optimizer
from mtr_jax.train.step import make_train_step, split_micro, put_micro_batches
from mtr_jax.train.grpo import make_grpo_loss

mc = qwen2.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
rng = np.random.RandomState(0)
B, T = 8, 32
tokens = rng.randint(0, 128, (B, T)).astype(np.int32)
seg = np.ones((B, T), np.int32); seg[:, 20:] = 2; seg[-1, 28:] = 0
pos = np.concatenate([np.arange(20), np.arange(12)])[None].repeat(B, 0).astype(np.int32)
mask = (rng.uniform(size=(B, T)) > 0.4).astype(np.int32)
sft_batch = dict(tokens=tokens, loss_mask=mask, segment_ids=seg, positions=pos)
g = GRPOConfig(beta=0.04, max_new_tokens=16, max_turns=2)
grpo_batch = dict(tokens=tokens, segment_ids=seg, positions=pos, mask=mask.astype(np.float32),
                  old_logp=rng.uniform(-5, -1, (B, T - 1)).astype(np.float32),
                  ref_logp=rng.uniform(-5, -1, (B, T - 1)).astype(np.float32),
                  adv=rng.normal(size=B).astype(np.float32), sampler_logp=np.zeros((B, T), np.float32))

def run(mesh, loss_num, batch):
    params = qwen2.init_params(mc, jax.random.PRNGKey(0))
    tx, _ = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), 10)
    if mesh is not None:
        params = jax.device_put(params, param_shardings(mc, mesh))
    opt = jax.jit(tx.init)(params)
    step = make_train_step(loss_num, lambda b: jnp.float32(37.0), tx)
    mb = put_micro_batches(split_micro(batch, 2), mesh)
    p, o, m = step(params, opt, mb)
    return jax.device_get(p), float(m["loss"])

def sft_loss(p, mb):
    n, d = losses.sft_loss_num(p, mc, mb)
    return n, {"tokens": d}

mesh8 = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
mesh1 = make_mesh({"data": 1}, devices=jax.devices()[:1])
for name, fn, batch in (("sft", sft_loss, sft_batch), ("grpo", make_grpo_loss(mc, g), grpo_batch)):
    p8, l8 = run(mesh8, fn, batch)
    p1, l1 = run(mesh1, fn, batch)
    d = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(p8), jax.tree_util.tree_leaves(p1)))
    print(name, abs(l8 - l1), d)
    # params after one AdamW step: a near-zero gradient entry's summation-order noise is scaled
    # up to ~lr by Adam's normalisation, so the parameter bound is 2e-5 (the loss: 1e-5)
    assert abs(l8 - l1) <= 1e-5 and d <= 2e-5, (name, l8, l1, d)
print("OK")
''')
    assert "OK" in out


@pytest.mark.parametrize("temperature,mu", [(0.7, 2), (0.6, 1)])
def test_grpo_logprob_gap_is_zero_at_any_temperature(tmp_path, temperature, mu):
    """The sampler stores log-probs of the tempered policy (before top-k/top-p), the trainer scores
    the same distribution: in float32 their gap is ~0 at temperature != 1 too, both for the separate
    old-policy forward (mu=2) and the on-policy shortcut (mu=1)."""
    run = str(tmp_path / "r")
    cfg, mc, params, tok, train, actor, tm = grpo_setting(
        run, steps=2, extra=(f"grpo.temperature={temperature}", f"grpo.mu={mu}", f"grpo.minibatches={mu}", "grpo.top_p=0.9"))
    train_grpo(cfg, mc, params, tok, train, actor, tm, run, progress=False)
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    assert len(rows) == 2 and all(r["logprob_gap"] < 1e-4 for r in rows), [r["logprob_gap"] for r in rows]


def test_grpo_on_policy_shortcut_equals_explicit_old_logprobs():
    """mu=1, one minibatch: logp_old = stop_gradient(logp) must give exactly the loss and gradient
    of feeding the old-policy log-probs from a separate forward (what mu>1 does)."""
    from mtr_jax.config import GRPOConfig
    from mtr_jax.train.grpo import make_grpo_loss

    mc = qwen2.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    params = qwen2.init_params(mc, jax.random.PRNGKey(0), std=0.1)
    rng = np.random.RandomState(0)
    B, T = 4, 24
    tokens = rng.randint(0, 128, (B, T)).astype(np.int32)
    mb = dict(tokens=tokens, segment_ids=np.ones((B, T), np.int32), positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)),
              mask=(rng.uniform(size=(B, T)) > 0.5).astype(np.float32), adv=rng.normal(size=B).astype(np.float32),
              ref_logp=rng.uniform(-5, -1, (B, T - 1)).astype(np.float32), sampler_logp=np.zeros((B, T), np.float32))
    g = GRPOConfig(beta=0.04)
    from mtr_jax.train.losses import token_logprobs
    mb_off = dict(mb, old_logp=np.asarray(token_logprobs(params, mc, tokens)[0]))
    (l_on, _), g_on = jax.value_and_grad(make_grpo_loss(mc, g, on_policy=True), has_aux=True)(params, dict(mb, old_logp=None))
    (l_off, _), g_off = jax.value_and_grad(make_grpo_loss(mc, g, on_policy=False), has_aux=True)(params, mb_off)
    assert abs(float(l_on) - float(l_off)) < 1e-5
    np.testing.assert_allclose(_flat(g_on), _flat(g_off), atol=1e-6)


@pytest.mark.parametrize("scan,dtype", [(False, "float32"), (True, "float32"), (False, "bfloat16")])
def test_shared_prompt_logprobs_and_gradients_equal_full_rows(scan, dtype):
    """The update's shared-prompt forward (each group's prompt run once) gives the full-row
    forward's log-probs, entropies and gradients on every completion token, for prompts of
    different lengths (right-padded) and G completions each. bfloat16 compute (the demo's): the
    same up to bf16 rounding (XLA:CPU lacks some bf16 contractions; this runs them all)."""
    import jax.numpy as jnp

    from mtr_jax.train import losses

    mc = qwen2.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, scan_layers=scan,
                           dtype=dtype, param_dtype="float32")
    params = qwen2.init_params(mc, jax.random.PRNGKey(0), std=0.2)
    rng = np.random.RandomState(1)
    Bq, G, P, C = 3, 3, 16, 8
    plen = np.array([16, 9, 4], np.int32)
    prompts = rng.randint(1, 96, (Bq, P)).astype(np.int32)
    comps = rng.randint(1, 96, (Bq * G, C)).astype(np.int32)
    w = rng.normal(size=(Bq * G, C)).astype(np.float32)
    # full rows: prompt + completion, right-padded to P + C, label-side positions plen-1 .. plen+C-2
    T = P + C
    rows = np.zeros((Bq * G, T), np.int32)
    seg = np.zeros((Bq * G, T), np.int32)
    for r in range(Bq * G):
        n = plen[r // G]
        rows[r, :n + C] = np.concatenate([prompts[r // G, :n], comps[r]])
        seg[r, :n + C] = 1
    idx = (plen.repeat(G) - 1)[:, None] + np.arange(C)[None, :]

    def shared(p):
        lp, ent = losses.completion_logprobs(p, mc, prompts, plen, comps)
        return jnp.sum(w * lp), (lp, ent)

    def full(p):
        lp, ent = losses.token_logprobs(p, mc, rows, seg)
        lp, ent = jnp.take_along_axis(lp, idx, axis=1), jnp.take_along_axis(ent, idx, axis=1)
        return jnp.sum(w * lp), (lp, ent)

    (v_s, (lp_s, ent_s)), g_s = jax.jit(jax.value_and_grad(shared, has_aux=True))(params)
    (v_f, (lp_f, ent_f)), g_f = jax.jit(jax.value_and_grad(full, has_aux=True))(params)
    if dtype == "bfloat16":
        np.testing.assert_allclose(np.asarray(lp_s), np.asarray(lp_f), atol=0.05)
        a, b = _flat(g_s), _flat(g_f)
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999
        return
    np.testing.assert_allclose(np.asarray(lp_s), np.asarray(lp_f), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent_s), np.asarray(ent_f), atol=1e-5)
    assert float(jnp.max(jnp.abs(lp_s))) > 1.0  # not a degenerate all-equal case
    np.testing.assert_allclose(_flat(g_s), _flat(g_f), rtol=1e-5, atol=2e-5)  # f32 summation order
    assert float(np.abs(_flat(g_f)).max()) > 1e-2


def test_grpo_shared_prompt_update_equals_full_rows(tmp_path):
    """One GRPO update (mu=2, two minibatches, beta > 0) of the same episodes from the same params:
    the shared-prompt update and the full-row update give the same parameters and metrics. The
    episodes are real rollouts, extended by a tool response (masked) and a second turn, so the
    completion coordinates hold masked tokens between generated ones, as multi-turn episodes do."""
    from mtr_jax.train.grpo import GRPOTrainer

    rng = np.random.RandomState(0)
    out = {}
    for share in (True, False):
        cfg, mc, params, tok, train, actor, tm = grpo_setting(str(tmp_path / str(share)), extra=[f"grpo.share_prompt={str(share).lower()}"])
        p0 = _flat(params)  # (the update donates the params' buffers)
        tr = GRPOTrainer(cfg, mc, params, tok, train, actor, tm)
        if share:
            eps = tr.rollout(train[:2], jax.random.PRNGKey(3), 2)
            for k, e in enumerate(eps):  # tool response (not trained on), then a second turn
                extra = list(rng.randint(5, 60, 5 + k))
                e.token_ids += extra + extra[:3]
                e.loss_mask += [0] * len(extra) + [1] * 3
                e.logprobs += [0.0] * len(extra) + [-1.5] * 3
            adv = rng.normal(size=len(eps)).astype(np.float32)
        met = tr._update(eps, adv)
        assert met["shared_prompt"] == float(share)
        out[share] = (_flat(tr.params), met)
    (p_s, m_s), (p_f, m_f) = out[True], out[False]
    for k in ("loss", "kl", "entropy", "clip_frac", "logprob_gap"):
        assert abs(m_s[k] - m_f[k]) < 1e-5, (k, m_s[k], m_f[k])
    assert m_s["kl"] > 0 and m_s["loss"] != 0
    assert np.abs(p_s - p_f).max() < 1e-6 and np.abs(p_s - p0).max() > 1e-4


@pytest.mark.parametrize("share", [True, False])
def test_grpo_update_of_kept_groups_equals_the_padded_batch(tmp_path, share):
    """drop_equal_groups keeps 1 group of a batch of 4: the update pads it to 1 group, not 4, and
    gives the parameters and metrics of the update padded to the whole batch (padding rows have no
    tokens), on both update layouts (shared prompt and full rows)."""
    from mtr_jax.train.grpo import GRPOTrainer

    out = {}
    for drop in (True, False):
        cfg, mc, params, tok, train, actor, tm = grpo_setting(
            str(tmp_path / str(drop)), extra=["grpo.batch_size=4", "grpo.mu=1", "grpo.minibatches=1", "grpo.optim.warmup_steps=0",
                                              f"grpo.drop_equal_groups={str(drop).lower()}",
                                              f"grpo.share_prompt={str(share).lower()}"])
        p0 = _flat(params)  # (the update donates the params' buffers)
        tr = GRPOTrainer(cfg, mc, params, tok, train, actor, tm)
        eps = tr.rollout(train[:1], jax.random.PRNGKey(3), 2)
        met = tr._update(eps, np.array([0.9, -0.4], np.float32))
        assert met["shared_prompt"] == float(share)
        out[drop] = (_flat(tr.params), met, tr._update_groups(len(eps)))
    (p_d, m_d, groups_d), (p_f, m_f, groups_f) = out[True], out[False]
    assert (groups_d, groups_f) == (1, 4)
    for k in ("loss", "kl", "entropy", "logprob_gap"):
        assert abs(m_d[k] - m_f[k]) < 1e-6, (k, m_d[k], m_f[k])
    assert abs(m_d["grad_norm"] - m_f["grad_norm"]) <= 1e-5 * m_f["grad_norm"]
    # AdamW's first step moves each parameter by ~lr = 1e-3; 1e-5 is 1% of that (summation order)
    assert np.abs(p_d - p_f).max() < 1e-5 and np.abs(p_d - p0).max() > 1e-4 and m_d["loss"] != 0


@pytest.mark.parametrize("share", [True, False])
def test_grpo_grad_accum_gives_the_update_of_one_batch(tmp_path, share):
    """grpo.grad_accum=2 runs the update as two micro-batches of whole groups (half the activation
    memory) and sums their gradients: the same parameters and metrics as the one-batch update, on
    both update layouts. Advantages differ per group, so a micro-batch mix-up would show."""
    from mtr_jax.train.grpo import GRPOTrainer

    out = {}
    for accum in (1, 2):
        cfg, mc, params, tok, train, actor, tm = grpo_setting(
            str(tmp_path / str(accum)), extra=["grpo.batch_size=4", "grpo.mu=1", "grpo.minibatches=1", "grpo.beta=0",
                                               "grpo.optim.warmup_steps=0", f"grpo.grad_accum={accum}",
                                               f"grpo.share_prompt={str(share).lower()}"])
        p0 = _flat(params)  # (the update donates the params' buffers)
        tr = GRPOTrainer(cfg, mc, params, tok, train, actor, tm)
        eps = tr.rollout(train[:4], jax.random.PRNGKey(3), 2)
        adv = np.array([0.9, -0.4, 1.3, -1.1, 0.2, 0.7, -0.8, 0.5], np.float32)
        met = tr._update(eps, adv)
        assert met["shared_prompt"] == float(share)
        out[accum] = (_flat(tr.params), met)
    (p_1, m_1), (p_2, m_2) = out[1], out[2]
    for k in ("loss", "entropy", "logprob_gap"):
        assert abs(m_1[k] - m_2[k]) <= 1e-5 * max(abs(m_1[k]), 1.0), (k, m_1[k], m_2[k])
    assert abs(m_1["grad_norm"] - m_2["grad_norm"]) <= 1e-5 * m_1["grad_norm"]
    # AdamW's first step moves each parameter by ~lr = 1e-3; 1e-5 is 1% of that (summation order)
    assert np.abs(p_1 - p_2).max() < 1e-5 and np.abs(p_1 - p0).max() > 1e-4 and m_1["loss"] != 0


def test_grpo_grad_accum_must_split_into_whole_groups(tmp_path):
    from mtr_jax.errors import MtrError
    from mtr_jax.train.grpo import GRPOTrainer

    cfg, mc, params, tok, train, actor, tm = grpo_setting(str(tmp_path), extra=["grpo.batch_size=2", "grpo.mu=1",
                                                                              "grpo.minibatches=1", "grpo.grad_accum=4"])
    with pytest.raises(MtrError, match="grad_accum=4 must divide"):
        GRPOTrainer(cfg, mc, params, tok, train, actor, tm)


def test_grpo_drop_void_turns_leaves_void_episodes_out_of_the_step(tmp_path):
    """SimpleTIR's filter: with grpo.drop_void_turns an episode cut at the turn budget changes nothing in
    the step whatever its tokens or reward (params bitwise equal); without the filter it does."""
    from mtr_jax.train.grpo import GRPOTrainer, has_void_turn

    out = {}
    for drop in (True, False):
        for variant in (0, 1):
            cfg, mc, params, tok, train, actor, tm = grpo_setting(
                str(tmp_path / f"{drop}{variant}"), extra=["grpo.mu=1", "grpo.minibatches=1", "grpo.beta=0",
                                                           "grpo.group_size=3", "grpo.optim.warmup_steps=0",
                                                           f"grpo.drop_void_turns={str(drop).lower()}"])
            tr = GRPOTrainer(cfg, mc, params, tok, train, actor, tm)
            eps = tr.rollout(train[:2], jax.random.PRNGKey(3), 3)
            for e in eps:
                e.end_reason = "answer"
                e.turn_texts = ["<think>x</think><answer>y</answer>"]
            void = eps[1]
            void.end_reason, void.turn_texts = "length", ["<think>x: x: x: x"]
            if variant:  # other tokens where the void episode sampled, and another reward
                gen = [i for i, m in enumerate(void.loss_mask) if m]
                for i in gen:
                    void.token_ids[i] = (void.token_ids[i] + 7) % mc.vocab_size
            assert has_void_turn(void) and not has_void_turn(eps[0])
            tr.rollout = lambda recs, key, G, _e=eps: _e
            tr.score = lambda es, v=variant: [{"reward": rv, "em": 0.0} for rv in
                                              ([0.0, -1.0 if v == 0 else 0.7, 1.0, 0.2, 0.5, 0.9])]
            met, _, _ = tr.step(train[:2], jax.random.PRNGKey(4))
            assert met.get("void_episodes", 0) == (1 if drop else 0)
            out[drop, variant] = _flat(tr.params)
    assert np.array_equal(out[True, 0], out[True, 1])
    assert np.abs(out[False, 0] - out[False, 1]).max() > 1e-6


# ------------------------------------------------------------------------------------------------
# Bad input at the CLI: one line, exit 2.


def _mtr(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mtr_jax.cli", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["sft.nonsense=1"], "unknown config key 'sft.nonsense'"),
    (["sft.steps=many"], "sft.steps"),
    (["model.init_from=/nonexistent/ckpt"], "/nonexistent/ckpt"),
])
def test_cli_bad_config_is_one_line_exit_2(tmp_path, args, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  traces: %s\n" % (tmp_path / "t.jsonl"))
    (tmp_path / "t.jsonl").write_text("")
    r = _mtr("sft", "--config", str(cfg), *args)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_cli_missing_checkpoint_and_no_traces(tmp_path):
    cfg = tmp_path / "c.yaml"
    (tmp_path / "t.jsonl").write_text(json.dumps({"messages": "not a list"}) + "\n")
    cfg.write_text(f"data:\n  traces: {tmp_path / 't.jsonl'}\nrun:\n  out_dir: {tmp_path / 'run'}\n")
    r = _mtr("sft", "--config", str(cfg))
    assert r.returncode == 2 and "t.jsonl:1" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _mtr("export-hf", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "hf"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


def test_non_finite_step_leaves_params_and_optimizer_state_untouched():
    """A NaN loss (or gradient) is a skipped step: params and AdamW state bitwise as before,
    `skipped` = 1; the next finite step updates as usual."""
    import jax.numpy as jnp

    from mtr_jax.config import OptimConfig
    from mtr_jax.train.optim import make_optimizer
    from mtr_jax.train.step import make_train_step

    tx, _ = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), 10)

    def loss_num(p, mb):
        return jnp.sum((p["w"] * mb["x"]) ** 2) * mb["scale"][0], {}

    step = make_train_step(loss_num, lambda b: jnp.float32(1.0), tx, donate=False)
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    opt = tx.init(params)
    good = {"x": jnp.ones((1, 2, 3)), "scale": jnp.ones((1, 1))}
    params, opt, m = step(params, opt, good)
    assert float(m["skipped"]) == 0.0
    before = [np.asarray(x).copy() for x in jax.tree_util.tree_leaves((params, opt))]
    bad = {"x": jnp.ones((1, 2, 3)), "scale": jnp.full((1, 1), jnp.nan)}
    p2, o2, m = step(params, opt, bad)
    assert float(m["skipped"]) == 1.0
    after = [np.asarray(x) for x in jax.tree_util.tree_leaves((p2, o2))]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    p3, _, m = step(p2, o2, good)
    assert float(m["skipped"]) == 0.0 and not np.array_equal(np.asarray(p3["w"]), before[0])
