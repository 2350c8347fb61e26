"""Shared-prefix SFT (`sft.share_prefix`): each micro-batch's common prefix runs once. Checked
against the packed-row loss (`sft_loss_num`, the dense reference) on the same examples: loss and
gradient equal in float32; the trainer's loss falls; a killed run resumes to the same params."""

import jax
import jax.numpy as jnp
import numpy as np

from mtr_jax.config import load_config
from mtr_jax.data.pipeline import shared_prefix_batches, shared_prefix_layout
from mtr_jax.model import qwen2
from mtr_jax.train import losses


def _setup(n=12, prefix=40, learnable=False):
    mc = qwen2.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    params = qwen2.init_params(mc, jax.random.PRNGKey(0), std=0.1)
    rng = np.random.RandomState(0)
    head = rng.randint(3, 128, prefix).astype(np.int32)  # the shared "system prompt + tools"
    examples = []
    for _ in range(n):
        q = rng.randint(3, 128, int(rng.randint(3, 9))).astype(np.int32)
        a = rng.randint(3, 128, int(rng.randint(5, 30))).astype(np.int32)
        if learnable:  # the answer repeats the question: a pattern a few steps can learn
            a = np.tile(q, 4)[:len(a)]
        ids = np.concatenate([head, q, a])
        mask = np.zeros(len(ids), np.int32)
        mask[prefix + len(q):] = 1
        examples.append((ids, mask))
    return mc, params, examples


def _dense(rows, T=128):
    B = len(rows)
    tok = np.zeros((B, T), np.int32); lm = np.zeros((B, T), np.int32); seg = np.zeros((B, T), np.int32)
    for i, (ids, m) in enumerate(rows):
        tok[i, :len(ids)], lm[i, :len(ids)], seg[i, :len(ids)] = ids, m, 1
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    return {"tokens": tok, "loss_mask": lm, "segment_ids": seg, "positions": pos}


def test_shared_prefix_loss_and_grad_equal_the_dense_rows():
    mc, params, examples = _setup()
    rows = examples[:6]
    b = shared_prefix_layout(rows, groups=2)
    assert b["prompts"].shape == (2, 128) and min(b["prompt_lens"]) >= 40
    assert b["mask"].sum() == sum(int(m.sum()) for _, m in rows)  # no label lost into a prompt
    d = _dense(rows)

    def shared(p):
        nums = [losses.sft_shared_loss_num(p, mc, {k: v[g:g + 1] if k in ("prompts", "prompt_lens") else v[3 * g:3 * g + 3]
                                                   for k, v in b.items() if k != "real_tokens"})[0] for g in range(2)]
        return nums[0] + nums[1]

    dense = lambda p: losses.sft_loss_num(p, mc, d)[0]
    a, ga = jax.value_and_grad(shared)(params)
    c, gc = jax.value_and_grad(dense)(params)
    np.testing.assert_allclose(float(a), float(c), rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gc)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5 * max(1.0, float(jnp.abs(y).max())))


def test_shared_prefix_batches_state_and_shapes():
    _, _, examples = _setup(n=10)
    it = shared_prefix_batches(examples, 4, groups=2, seed=1)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    nxt = next(it)
    it2 = shared_prefix_batches(examples, 4, groups=2, seed=1)
    it2.set_state(state)
    again = next(it2)
    for k in nxt:
        np.testing.assert_array_equal(nxt[k], again[k])
    assert all(b["completions"].shape[1] in (64, 128) for b in first)


def test_train_sft_share_prefix_loss_falls_and_resumes(tmp_path):
    from mtr_jax.train.sft import train_sft

    mc, params, examples = _setup(n=16, learnable=True)
    args = ["sft.steps=8", "sft.batch_size=4", "sft.grad_accum=2", "sft.share_prefix=true", "sft.optim.lr=1e-2",
            "sft.optim.warmup_steps=0", "run.checkpoint_every=4", "run.log_every=1"]
    cfg = load_config(None, args + [f"run.out_dir={tmp_path / 'a'}"])
    fresh = lambda: jax.tree_util.tree_map(jnp.copy, params)  # train_sft donates its params
    full, m = train_sft(cfg, mc, fresh(), examples, str(tmp_path / "a"), progress=False)
    import json

    rows = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    cfg = load_config(None, args + [f"run.out_dir={tmp_path / 'b'}"])
    train_sft(cfg, mc, fresh(), examples, str(tmp_path / "b"), progress=False, stop_after=5)  # cut after step 5
    resumed, _ = train_sft(cfg, mc, fresh(), examples, str(tmp_path / "b"), progress=False, resume=True)
    for x, y in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
