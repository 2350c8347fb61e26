"""GRPO and SFT losses against an independent NumPy implementation of the documented formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtr_jax.train import losses


def numpy_grpo(logp, old, ref, adv, mask, eps_low, eps_high, beta, agg, max_len):
    """Straight from the formula in the losses module docstring, loop by loop."""
    n, t = logp.shape
    per_seq_sum, per_seq_cnt = [], []
    for i in range(n):
        s, c = 0.0, 0.0
        for j in range(t):
            if not mask[i, j]:
                continue
            rho = np.exp(logp[i, j] - old[i, j])
            clipped = min(max(rho, 1 - eps_low), 1 + eps_high)
            pg = -min(rho * adv[i], clipped * adv[i])
            d = ref[i, j] - logp[i, j]
            kl = np.exp(d) - d - 1
            s += pg + beta * kl
            c += 1
        per_seq_sum.append(s)
        per_seq_cnt.append(c)
    if agg == "token-mean":
        return sum(per_seq_sum) / sum(per_seq_cnt)
    if agg == "seq-mean-token-mean":
        return np.mean([s / max(c, 1) for s, c in zip(per_seq_sum, per_seq_cnt)])
    return np.mean([s / max_len for s in per_seq_sum])


@pytest.fixture
def fixed():
    rng = np.random.RandomState(0)
    n, t = 6, 9
    logp = rng.uniform(-3, -0.1, (n, t))
    old = logp + rng.normal(0, 0.3, (n, t))  # ratios both inside and outside the clip range
    ref = logp + rng.normal(0, 0.5, (n, t))
    adv = rng.normal(0, 1, n)
    mask = (rng.uniform(size=(n, t)) > 0.3).astype(np.float64)
    mask[2] = 0.0  # an episode with no generated tokens
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("agg", losses.LOSS_AGGS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_numpy(fixed, agg, beta):
    logp, old, ref, adv, mask = fixed
    kw = dict(eps_low=0.2, eps_high=0.28, beta=beta, loss_agg=agg, max_len=16)
    want = numpy_grpo(logp, old, ref, adv, mask, 0.2, 0.28, beta, agg, 16)
    num, _ = losses.grpo_loss_num(*(jnp.asarray(x, jnp.float32) for x in (logp, old, ref, adv, mask)), **kw)
    got = float(num) / losses.grpo_denominator(mask, agg)
    assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (got, want)
    # the same loss split into micro-batches, each divided by the step's denominator
    den = losses.grpo_denominator(mask, agg)
    parts = [losses.grpo_loss_num(*(jnp.asarray(x[s], jnp.float32) for x in (logp, old, ref, adv, mask)), **kw)[0]
             for s in (slice(0, 2), slice(2, 5), slice(5, 6))]
    assert abs(sum(float(p) for p in parts) / den - want) <= 1e-6 * max(1.0, abs(want))
    # the in-jit denominator (what the trainer uses) agrees with the NumPy one; padded rows count 0
    pad = np.zeros((2, mask.shape[1] + 1))
    b = {"mask": np.concatenate([np.pad(mask, ((0, 0), (1, 0))), pad]),
         "segment_ids": np.concatenate([np.ones((mask.shape[0], mask.shape[1] + 1)), pad])}
    assert float(losses.grpo_denominator_jnp(b, agg)) == den


def test_grpo_gradient_raises_positive_advantage_logprobs(fixed):
    logp, old, ref, adv, mask = fixed
    adv = np.array([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    old = logp.copy()  # on-policy: ratio 1, inside the clip range

    def loss(lp):
        num, _ = losses.grpo_loss_num(lp, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask),
                                      eps_low=0.2, eps_high=0.2, beta=0.0, loss_agg="token-mean", max_len=16)
        return num / losses.grpo_denominator(mask, "token-mean")

    g = np.asarray(jax.grad(loss)(jnp.asarray(logp)))
    step = logp - 0.1 * g  # gradient descent on the loss
    for i in range(len(adv)):
        m = mask[i] > 0
        if not m.any():
            continue
        moved = (step[i][m] - logp[i][m])
        assert (np.sign(moved) == np.sign(adv[i])).all()


def test_group_advantages():
    r = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    a = losses.group_advantages(r, 4)
    g = r[:4]
    np.testing.assert_allclose(a[:4], (g - g.mean()) / (g.std(ddof=1) + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(a[4:], 0.0)  # equal rewards: no signal
    np.testing.assert_allclose(losses.group_advantages(r, 4, scale_std=False)[:4], g - g.mean(), rtol=1e-6)


def test_group_advantages_leave_out_episodes():
    """`valid` (grpo.drop_void_turns): each group scored as if it held only its valid episodes (NumPy on
    the subset), left-out episodes get 0, a group with one valid episode carries no signal."""
    r = np.array([1.0, -1.0, 0.0, 0.5, -1.0, 0.3, -1.0, -1.0], np.float32)
    v = np.array([1, 0, 1, 1, 0, 1, 0, 0], bool)
    for scale in (True, False):
        a = losses.group_advantages(r, 4, scale_std=scale, valid=v)
        g = r[:4][v[:4]].astype(np.float64)
        want = g - g.mean()
        if scale:
            want = want / (g.std(ddof=1) + 1e-6)
        np.testing.assert_allclose(a[:4][v[:4]], want, rtol=1e-6)
        np.testing.assert_allclose(a[~v], 0.0)
        np.testing.assert_allclose(a[4:], 0.0)  # one valid episode: no spread
    np.testing.assert_array_equal(losses.group_advantages(r, 4, valid=np.ones(8, bool)), losses.group_advantages(r, 4))


def test_sft_loss_ignores_non_assistant_tokens():
    from util import tiny_config
    from mtr_jax.model import qwen2

    cfg = tiny_config()
    params = qwen2.init_params(cfg, jax.random.PRNGKey(0), std=0.2)
    rng = np.random.RandomState(1)
    tokens = rng.randint(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    mask = np.zeros((2, 12), np.int32)
    mask[:, 8:] = 1  # only the last 4 tokens are labels
    seg = np.ones((2, 12), np.int32)
    pos = np.tile(np.arange(12, dtype=np.int32), (2, 1))
    b = dict(tokens=tokens, loss_mask=mask, segment_ids=seg, positions=pos)
    num, den = losses.sft_loss_num(params, cfg, b)
    # tokens after the last label change nothing; a different label changes it
    # (tokens BEFORE the labels are context, so they legitimately matter)
    logits = np.asarray(qwen2.forward(params, cfg, tokens))
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = -sum(logits[i, t - 1, tokens[i, t]] - lse[i, t - 1] for i in range(2) for t in range(8, 12))
    assert abs(float(num) - want) < 1e-3 and float(den) == 8
    # non-label tokens are masked: changing the label mask to exclude a token changes the loss by its term only
    b2 = dict(b, loss_mask=np.zeros_like(mask))
    assert float(losses.sft_loss_num(params, cfg, b2)[0]) == 0.0


@pytest.mark.parametrize("tied,temperature", [(True, 1.0), (False, 1.0), (False, 0.7)])
def test_vocab_chunked_logprobs_equal_dense(tied, temperature):
    """The vocabulary-chunked head (4 chunks here) gives the dense log-probs, entropies and
    gradients to 1e-6 in float32, relative as well as absolute: at -8.6 one float32 ulp is 9.5e-7,
    and the two logsumexps sum in another order (on an AVX2-only CPU one of 60 differed by 1.9e-6,
    2 ulps)."""
    from mtr_jax.model import qwen2
    from util import tiny_config

    cfg = tiny_config(tie_word_embeddings=tied)
    params = qwen2.init_params(cfg, jax.random.key(1), std=0.3)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (3, 21)), jnp.int32)
    assert losses.vocab_chunk(cfg.vocab_size, 64) == 64 and losses.vocab_chunk(151936) == 18992

    def f(p, chunked):
        if chunked:
            h = qwen2.hidden_states(p, cfg, tokens)[:, :-1]
            return losses.head_logp_entropy(p, cfg, h, tokens[:, 1:], temperature, chunk=64)
        return losses.dense_token_logprobs(p, cfg, tokens, temperature=temperature)

    (lp_c, ent_c), (lp_d, ent_d) = f(params, True), f(params, False)
    np.testing.assert_allclose(lp_c, lp_d, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ent_c, ent_d, atol=1e-5)  # a logged metric; the dense one cancels logit-sized terms
    g = lambda chunked: jax.grad(lambda p: jnp.sum(f(p, chunked)[0]) + 0.1 * jnp.sum(f(p, chunked)[1]))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g(True)), jax.tree_util.tree_leaves(g(False))):
        assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, float(np.max(np.abs(b))))  # float32 sums in another order


def test_sft_loss_at_label_positions_equals_dense():
    """SFT with the head only at label positions (label_index) = the dense loss, value and
    gradient, on packed rows with two segments and padding."""
    from mtr_jax.model import qwen2
    from util import tiny_config

    cfg = tiny_config(tie_word_embeddings=False)
    params = qwen2.init_params(cfg, jax.random.key(2), std=0.3)
    rng = np.random.RandomState(1)
    B, T = 2, 24
    tokens = rng.randint(0, cfg.vocab_size, (B, T)).astype(np.int32)
    seg = np.array([[1] * 10 + [2] * 10 + [0] * 4, [1] * 24], np.int32)
    pos = np.array([list(range(10)) + list(range(10)) + [0] * 4, list(range(24))], np.int32)
    lm = (rng.rand(B, T) < 0.3) & (seg > 0)
    dense = {"tokens": tokens, "loss_mask": lm, "segment_ids": seg, "positions": pos}
    idx, w = losses.label_index(lm, seg, min_bucket=4)
    assert idx.shape[1] >= int(losses.label_mask(lm, seg).sum(-1).max()) and w.sum() == losses.label_mask(lm, seg).sum()
    sel = dict(dense, label_idx=idx, label_w=w)
    f = lambda p, b: losses.sft_loss_num(p, cfg, {k: jnp.asarray(v) for k, v in b.items()})
    (n_d, d_d), (n_s, d_s) = f(params, dense), f(params, sel)
    assert float(d_d) == float(d_s) > 0
    np.testing.assert_allclose(n_s, n_d, rtol=1e-6)
    gd = jax.grad(lambda p: f(p, dense)[0])(params)
    gs = jax.grad(lambda p: f(p, sel)[0])(params)
    for a, b in zip(jax.tree_util.tree_leaves(gs), jax.tree_util.tree_leaves(gd)):
        assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, float(np.max(np.abs(b))))
