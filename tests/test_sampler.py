"""Sampler tests on a tiny random Qwen2. Oracles: transformers' PyTorch Qwen2ForCausalLM (greedy
generate, scores), teacher-forced `qwen2.forward` (log-probs), NumPy (filtered distributions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtr_jax.errors import MtrError
from mtr_jax.model import qwen2
from mtr_jax.sampling import Sampler, SamplingParams
from util import run_with_devices, tiny_config

GREEDY = SamplingParams(greedy=True)
CFG = tiny_config()
# std 0.15: sharp enough that greedy choices are not near-ties (parity stays robust), yet not degenerate
PARAMS = qwen2.init_params(CFG, jax.random.key(0), std=0.15)
PROMPTS = [[5, 17, 33, 2, 90, 11, 200], [3, 4], [250, 1, 7, 7, 7, 19, 42, 120, 66, 8, 9, 10, 13], [77]]


@pytest.fixture(scope="module")
def sampler():
    return Sampler(CFG, cache_len=256, eos_ids=[])


_forward = jax.jit(lambda p, t: jax.nn.log_softmax(qwen2.forward(p, CFG, t), axis=-1))


def teacher_logprobs(seq):
    """log_softmax of the full-sequence forward: row t predicts seq[t+1]. Right-padded to 64 (one
    compile; causal, so the padding does not change earlier rows)."""
    T = max(64, len(seq))
    padded = np.zeros((1, T), np.int32)
    padded[0, : len(seq)] = seq
    return np.asarray(_forward(PARAMS, jnp.asarray(padded)))[0, : len(seq)]


def to_torch(params, cfg):
    from mtr_jax.model.hf_io import torch_model

    return torch_model(params, cfg)


def test_greedy_matches_transformers_generate(sampler):
    import torch

    model = to_torch(PARAMS, CFG)
    T = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS])  # left padding
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False, eos_token_id=None,
                            pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    hf_tokens = hf.sequences[:, T:].numpy()
    hf_lp = torch.log_softmax(torch.stack(hf.scores, 1), -1).gather(-1, hf.sequences[:, T:, None])[..., 0].numpy()

    st = sampler.start(PARAMS, PROMPTS)
    st, out = sampler.generate(PARAMS, st, max_new_tokens=64, sampling=GREEDY, key=0)
    np.testing.assert_array_equal(out.tokens, hf_tokens)
    assert (out.lengths == 64).all() and (out.stop_reason == "length").all()
    np.testing.assert_allclose(out.plain_logprobs, hf_lp, atol=1e-4)
    assert len({tuple(r) for r in hf_tokens}) == len(PROMPTS) and len(set(hf_tokens.ravel())) > 8  # not degenerate
    np.testing.assert_array_equal(st.row_lengths, [len(p) + 64 for p in PROMPTS])


def test_continuation_equals_fresh_prefill_and_teacher_forcing(sampler):
    """Row 0 stops at a stop sequence, gets a tool response appended and continues; row 1 runs to
    max_new in turn 1 and is inactive in turn 2 (rows at different turns)."""
    st = sampler.start(PARAMS, PROMPTS[:2])
    _, probe = sampler.generate(PARAMS, st, max_new_tokens=12, sampling=GREEDY, key=0)
    g0 = list(probe.tokens[0])
    stop = g0[4:6]
    assert all(g0[j:j + 2] != stop for j in range(4)), "pick a stop sequence that first occurs at 4"

    s2 = Sampler(CFG, cache_len=256, eos_ids=[], stop_sequences=[stop, [251, 252, 253]])
    st = s2.start(PARAMS, PROMPTS[:2])
    st, o1 = s2.generate(PARAMS, st, max_new_tokens=12, sampling=GREEDY, key=0)
    assert list(o1.stop_reason) == ["stop", "length"]
    assert o1.lengths[0] == 6 and list(o1.tokens[0, :6]) == g0[:6]  # stop tokens are part of the output
    assert (o1.tokens[0, 6:] == 0).all() and (o1.plain_logprobs[0, 6:] == 0).all()
    tool = [101, 102, 103, 104, 105, 106, 107, 108, 109]
    st = s2.append(PARAMS, st, [tool, []])
    st, o2 = s2.generate(PARAMS, st, max_new_tokens=20, sampling=GREEDY, key=0, active=np.array([True, False]))
    assert o2.stop_reason[1] == "inactive" and o2.lengths[1] == 0
    hist = PROMPTS[0] + g0[:6] + tool
    assert st.row_lengths[0] == len(hist) + o2.lengths[0]
    assert st.row_lengths[1] == len(PROMPTS[1]) + 12

    fresh = s2.start(PARAMS, [hist])
    fresh, of = s2.generate(PARAMS, fresh, max_new_tokens=20, sampling=GREEDY, key=0)
    n = of.lengths[0]
    assert n == o2.lengths[0] and of.stop_reason[0] == o2.stop_reason[0]
    np.testing.assert_array_equal(o2.tokens[0, :n], of.tokens[0, :n])
    np.testing.assert_allclose(o2.plain_logprobs[0, :n], of.plain_logprobs[0, :n], atol=1e-5)

    # teacher forcing over prompt + turn 1 + tool + turn 2: plain log-probs of every generated token
    full = hist + list(o2.tokens[0, :n])
    ref = teacher_logprobs(full)
    lp1 = [ref[len(PROMPTS[0]) - 1 + j, g0[j]] for j in range(6)]
    lp2 = [ref[len(hist) - 1 + j, full[len(hist) + j]] for j in range(n)]
    np.testing.assert_allclose(o1.plain_logprobs[0, :6], lp1, atol=1e-4)
    np.testing.assert_allclose(o2.plain_logprobs[0, :n], lp2, atol=1e-4)
    # greedy: every token is the teacher-forced argmax
    assert all(np.argmax(ref[len(hist) - 1 + j]) == full[len(hist) + j] for j in range(n))


def _filtered_logprobs(logits, s: SamplingParams):
    """Independent NumPy: temperature, then top-k, then top-p (smallest set with mass >= p)."""
    z = logits.astype(np.float64) / s.temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros_like(z, bool)
    k = s.top_k if s.top_k > 0 else len(z)
    top = order[:k]
    p = np.exp(z[top] - z[top].max())
    p /= p.sum()
    n = int(np.searchsorted(np.cumsum(p), s.top_p - 1e-12)) + 1 if s.top_p < 1 else k
    keep[top[:n]] = True
    zz = np.where(keep, z, -np.inf)
    return zz - np.log(np.sum(np.exp(zz[keep] - zz[keep].max()))) - zz[keep].max(), keep


@pytest.mark.parametrize("sp", [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=5),
                                SamplingParams(temperature=0.9, top_p=0.8)])
def test_sampled_logprobs_and_support(sampler, sp):
    G = 3
    st = sampler.start(PARAMS, PROMPTS[:2], group_size=G)
    st, out = sampler.generate(PARAMS, st, max_new_tokens=16, sampling=sp, key=jax.random.key(1))
    assert out.tokens.shape == (2 * G, 16)
    for r in range(2 * G):
        p = PROMPTS[r // G]
        seq = p + list(out.tokens[r])
        ref = teacher_logprobs(seq)
        for j in range(16):
            logits_np = ref[len(p) - 1 + j]  # log_softmax is logits up to a constant: same filtered dist
            flp, keep = _filtered_logprobs(logits_np, sp)
            tok = seq[len(p) + j]
            assert keep[tok], (r, j)
            assert abs(flp[tok] - out.logprobs[r, j]) < 1e-4
            assert abs(logits_np[tok] - out.plain_logprobs[r, j]) < 1e-4
            tempered = logits_np / sp.temperature
            tempered = tempered - np.log(np.sum(np.exp(tempered - tempered.max()))) - tempered.max()
            assert abs(tempered[tok] - out.policy_logprobs[r, j]) < 1e-4  # what GRPO's trainer scores
    assert len({tuple(t) for t in out.tokens}) == 2 * G  # samples of one group differ


def test_sort_free_top_k_top_p_equals_sorted_reference():
    """The bisection thresholds keep exactly the tokens a full sort keeps (NumPy reference), on
    random rows of the real vocabulary size, with ties, for a grid of k and p."""
    from mtr_jax.sampling.decode import filter_top_k_top_p

    rng = np.random.default_rng(0)
    V = 151936
    rows = rng.normal(0, 3, (6, V)).astype(np.float32)
    rows[1, :50] = rows[1].max() + 1.0  # a 50-way tie at the top
    rows[2] = np.round(rows[2])  # many ties everywhere
    ks = np.array([0, 1, 40, 0, 1000, 7], np.int32)
    ps = np.array([0.9, 1.0, 0.5, 0.3, 0.95, 1e-4], np.float32)
    got = np.asarray(jax.jit(filter_top_k_top_p)(jnp.asarray(rows), jnp.asarray(ks), jnp.asarray(ps)))
    for r in range(6):
        z = rows[r].astype(np.float64)
        srt = np.sort(z)[::-1]
        k = ks[r] if ks[r] > 0 else V
        tk = srt[k - 1]
        kept = np.where(z >= tk, z, -np.inf)
        pr = np.exp(kept - kept.max())
        pr /= pr.sum()
        order = np.argsort(-kept, kind="stable")
        cum = np.cumsum(pr[order])
        n = max(int(np.sum(cum - pr[order] < ps[r])), 1)
        thresh = kept[order[n - 1]]
        ref = z >= max(thresh, tk)
        assert np.array_equal(np.isfinite(got[r]), ref), (r, int(np.isfinite(got[r]).sum()), int(ref.sum()))


def test_first_token_distribution_matches_softmax(sampler):
    """512 samples of one prompt's first token: chi-square of the empirical counts against
    softmax(logits / T) (10 most likely tokens + the rest as one bin; 10 dof, 0.1% level 29.6)."""
    G, T = 512, 0.7
    st = sampler.start(PARAMS, [PROMPTS[0]], group_size=G)
    _, out = sampler.generate(PARAMS, st, max_new_tokens=1, sampling=SamplingParams(temperature=T), key=7)
    p = np.exp(teacher_logprobs(PROMPTS[0])[-1] / T)
    p /= p.sum()
    counts = np.bincount(out.tokens[:, 0], minlength=CFG.vocab_size)
    top = np.argsort(-p)[:10]
    rest = np.ones(CFG.vocab_size, bool)
    rest[top] = False
    obs = np.append(counts[top], counts[rest].sum())
    exp = G * np.append(p[top], p[rest].sum())
    assert exp.min() > 5, exp  # chi-square needs populated bins
    chi2 = ((obs - exp) ** 2 / exp).sum()
    assert chi2 < 29.6, (chi2, obs, exp)
    assert len(np.unique(out.tokens)) > 10  # really sampling, not argmax


def test_seed_topk1_temp0_equal_greedy(sampler):
    def run(sp, key, active=None):
        st = sampler.start(PARAMS, PROMPTS, group_size=2)
        return sampler.generate(PARAMS, st, max_new_tokens=24, sampling=sp, key=key, active=active)[1]

    g = run(GREEDY, 0)
    a, b, c = run(SamplingParams(), 3), run(SamplingParams(), 3), run(SamplingParams(), 4)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.tokens != c.tokens).any()
    np.testing.assert_array_equal(run(SamplingParams(top_k=1), 5).tokens, g.tokens)
    t0 = run(SamplingParams(temperature=1e-6), 6)
    np.testing.assert_array_equal(t0.tokens, g.tokens)
    np.testing.assert_array_equal(t0.plain_logprobs, g.plain_logprobs)
    assert np.abs(t0.logprobs).max() < 1e-4  # a point mass, as for greedy
    # per-row controls: greedy rows inside a sampled batch still take the argmax
    mixed = [GREEDY if r % 2 == 0 else SamplingParams(temperature=1.5) for r in range(8)]
    m = run(mixed, 9)
    np.testing.assert_array_equal(m.tokens[::2], g.tokens[::2])


def test_eos_and_cache_full():
    """Row 0 (7 prompt tokens) ends on eos; row 1 (2 prompt tokens) fills its cache (13 slots)."""
    st0 = Sampler(CFG, cache_len=64, eos_ids=[])
    st = st0.start(PARAMS, PROMPTS[:2])
    _, probe = st0.generate(PARAMS, st, max_new_tokens=16, sampling=GREEDY, key=0)
    cands = [int(t) for t in probe.tokens[0, :4] if t not in probe.tokens[1, :11]]
    assert cands, probe.tokens
    eos = cands[0]
    first = list(probe.tokens[0]).index(eos)
    s = Sampler(CFG, cache_len=13, eos_ids=[eos])
    st = s.start(PARAMS, PROMPTS[:2])
    st, out = s.generate(PARAMS, st, max_new_tokens=16, sampling=GREEDY, key=0)
    assert out.stop_reason[0] == "eos" and out.lengths[0] == first + 1 and out.tokens[0, first] == eos
    assert out.stop_reason[1] == "cache_full" and out.lengths[1] == 11
    np.testing.assert_array_equal(out.tokens[1, :11], probe.tokens[1, :11])
    np.testing.assert_array_equal(st.row_lengths, [7 + first + 1, 13])
    _, again = s.generate(PARAMS, st, max_new_tokens=4, sampling=GREEDY, key=0, active=np.array([False, True]))
    assert list(again.stop_reason) == ["inactive", "cache_full"] and (again.lengths == 0).all()
    with pytest.raises(MtrError, match="row 1 would hold 14 tokens"):
        s.append(PARAMS, st, [[], [1]])


def test_stacked_scan_and_bf16_cache_paths(sampler):
    """Decoding over stacked weights (plain loop and lax.scan over layers, as on GPU/TPU) gives the
    unstacked CPU default's tokens; a bf16 KV cache stays close (same first tokens)."""
    st = sampler.start(PARAMS, PROMPTS)
    _, ref = sampler.generate(PARAMS, st, max_new_tokens=16, sampling=GREEDY, key=0)
    for cfg, unstack in ((CFG, False), (CFG.replace(scan_layers=True), False)):
        s = Sampler(cfg, cache_len=256, eos_ids=[], unstack_layers=unstack)
        _, o = s.generate(PARAMS, s.start(PARAMS, PROMPTS), max_new_tokens=16, sampling=GREEDY, key=0)
        np.testing.assert_array_equal(o.tokens, ref.tokens)
        np.testing.assert_allclose(o.plain_logprobs, ref.plain_logprobs, atol=1e-5)
    s = Sampler(CFG, cache_len=256, eos_ids=[], cache_dtype=jnp.bfloat16)
    st = s.start(PARAMS, PROMPTS)
    assert st.cache["k"].dtype == jnp.bfloat16
    _, o = s.generate(PARAMS, st, max_new_tokens=16, sampling=GREEDY, key=0)
    np.testing.assert_array_equal(o.tokens[:, :4], ref.tokens[:, :4])
    np.testing.assert_allclose(o.plain_logprobs[:, 0], ref.plain_logprobs[:, 0], atol=2e-2)
    # bf16 compute (the demo's and TPU's setting): prefill, decode, append a chunk, decode again;
    # every attention contraction must have a bf16 kernel (XLA:CPU lacks some layouts)
    s = Sampler(CFG.replace(dtype="bfloat16"), cache_len=256, eos_ids=[])
    st, o = s.generate(PARAMS, s.start(PARAMS, PROMPTS), max_new_tokens=4, sampling=GREEDY, key=0)
    np.testing.assert_allclose(o.plain_logprobs[:, 0], ref.plain_logprobs[:, 0], atol=5e-2)
    st = s.append(PARAMS, st, [[1, 2, 3]] * len(PROMPTS))
    _, o2 = s.generate(PARAMS, st, max_new_tokens=4, sampling=GREEDY, key=0)
    assert o2.tokens.shape[0] == len(PROMPTS) and np.isfinite(o2.plain_logprobs).all()


def test_no_recompilation_across_batches():
    s = Sampler(CFG, cache_len=128, eos_ids=[3], stop_sequences=[[9, 9]])
    compiles = []
    listener = lambda name, secs, **kw: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
    rng = np.random.default_rng(0)
    counts = []
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for i in range(20):
            prompts = [list(rng.integers(0, 256, rng.integers(18, 34))) for _ in range(3)]  # chunk bucket 32
            st = s.start(PARAMS, prompts, group_size=2)  # 6 rows -> batch bucket 8
            sp = SamplingParams(temperature=float(rng.uniform(0.5, 1.5)))
            st, out = s.generate(PARAMS, st, max_new_tokens=int(rng.integers(5, 17)), sampling=sp, key=i,
                                 active=rng.random(6) < 0.8)
            st = s.append(PARAMS, st, [list(rng.integers(0, 256, rng.integers(0, 17))) for _ in range(6)])
            st, out = s.generate(PARAMS, st, max_new_tokens=4, sampling=sp, key=i)
            counts.append((s.compiled_programs(), len(compiles)))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    # prefill, append: one program each; generate: one per attention window bucket (64 for the
    # first turn's rows, 128 = cache_len once appends make them longer), then nothing new
    assert counts[-1][0] == 4, counts[-1]
    assert all(c == counts[-1] for c in counts[2:]), counts


def test_bad_inputs(sampler):
    with pytest.raises(MtrError, match="prompt 1 is empty"):
        sampler.start(PARAMS, [[1, 2], []])
    with pytest.raises(MtrError, match="longer than cache_len"):
        sampler.start(PARAMS, [list(range(200)) + list(range(57))])
    with pytest.raises(MtrError, match="outside the vocabulary"):
        sampler.start(PARAMS, [[1, 999]])
    st = sampler.start(PARAMS, [[1, 2]])
    for bad in (0, -3, 2.5):
        with pytest.raises(MtrError, match="max_new_tokens"):
            sampler.generate(PARAMS, st, max_new_tokens=bad, sampling=GREEDY, key=0)
    with pytest.raises(MtrError, match="top_p"):
        sampler.generate(PARAMS, st, max_new_tokens=4, sampling=SamplingParams(top_p=0.0), key=0)
    with pytest.raises(MtrError, match=r"stop_sequences\[1\].*\[256\]"):
        Sampler(CFG, cache_len=64, eos_ids=[1], stop_sequences=[[1, 2], [5, 256]])
    with pytest.raises(MtrError, match="eos_ids"):
        Sampler(CFG, cache_len=64, eos_ids=[-1])
    with pytest.raises(MtrError, match="empty"):
        Sampler(CFG, cache_len=64, eos_ids=[1], stop_sequences=[[]])
    with pytest.raises(MtrError, match="2 token lists for 1 rows"):
        sampler.append(PARAMS, st, [[1], [2]])


def test_sharded_8_devices_same_greedy_tokens():
    out = run_with_devices(
        """
        import sys; sys.path.insert(0, "tests")
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from mtr_jax.model import qwen2
        from mtr_jax.sampling import Sampler, SamplingParams
        from util import tiny_config
        cfg = tiny_config()
        params = qwen2.init_params(cfg, jax.random.key(0), std=0.15)
        prompts = [[5, 17, 33, 2, 90, 11, 200], [3, 4], [250, 1, 7, 7, 7, 19, 42, 120, 66, 8, 9, 10, 13]]
        tool = [[101, 102, 103], [], [7, 8]]
        g = SamplingParams(greedy=True)

        def run(s, p):
            st = s.start(p, prompts, group_size=2)
            st, a = s.generate(p, st, max_new_tokens=20, sampling=g, key=0)
            st = s.append(p, st, tool + tool)
            st, b = s.generate(p, st, max_new_tokens=12, sampling=g, key=0)
            return np.concatenate([a.tokens, b.tokens], 1), np.concatenate([a.plain_logprobs, b.plain_logprobs], 1), st

        ref_t, ref_lp, _ = run(Sampler(cfg, cache_len=128, eos_ids=[]), params)
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
        # tensor-parallel layout for the weights (heads / mlp / vocab over "tensor"), rows over data x fsdp
        tp = {"q_heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}
        axes = qwen2.logical_axes(cfg)
        sharded = jax.tree_util.tree_map(
            lambda a, ax: jax.device_put(a, NamedSharding(mesh, P(*[tp.get(n) for n in ax]))), params, axes,
            is_leaf=lambda x: isinstance(x, tuple))
        s = Sampler(cfg, cache_len=128, eos_ids=[], mesh=mesh)
        t, lp, st = run(s, sharded)
        assert st.cache["k"].sharding.spec[1] == ("data", "fsdp"), st.cache["k"].sharding
        assert len(st.cache["k"].sharding.device_set) == 8
        np.testing.assert_array_equal(t, ref_t)
        np.testing.assert_allclose(lp, ref_lp, atol=1e-4)
        print("OK", st.batch_bucket, t.shape)
        """
    )
    assert "OK 8 (6, 32)" in out, out


def test_row_buckets_pad_little():
    """Row buckets as vLLM sizes its CUDA graphs: powers of two to 8, multiples of 8 to 512, then
    powers of two (an eval batch of 100 runs 104 rows, not 128); on the CPU no 1-row programs."""
    s = Sampler(CFG, cache_len=64, eos_ids=[])
    got = {n: s._batch_bucket(n) for n in (1, 2, 3, 5, 9, 16, 17, 100, 511, 513, 1500)}
    assert got == {1: 2, 2: 2, 3: 4, 5: 8, 9: 16, 16: 16, 17: 24, 100: 104, 511: 512, 513: 1024, 1500: 2048}, got


def test_shared_prefix_prefill_equals_full_prefill():
    """Prompts with a common 40-token prefix (then suffixes of different lengths, one empty): the
    prefix is prefilled once; tokens equal a full prefill's, log-probs and the cache to 1e-5, and
    the groups (G=2) and later appends behave the same."""
    rng = np.random.default_rng(3)
    prefix = list(map(int, rng.integers(1, 256, 40)))
    prompts = [prefix + list(map(int, rng.integers(1, 256, n))) for n in (5, 1, 23, 12)]
    shared = Sampler(CFG, cache_len=256, eos_ids=[])
    full = Sampler(CFG, cache_len=256, eos_ids=[], share_prefix=False)
    assert shared.common_prefix_len(prompts) == 40
    outs = []
    for s in (shared, full):
        st = s.start(PARAMS, prompts, group_size=2)
        st, o1 = s.generate(PARAMS, st, max_new_tokens=24, sampling=GREEDY, key=0)
        st = s.append(PARAMS, st, [[9, 8, 7]] * st.n_rows)
        st, o2 = s.generate(PARAMS, st, max_new_tokens=16, sampling=SamplingParams(temperature=1.0), key=1)
        outs.append((o1, o2, np.asarray(st.cache["k"])))
    (a1, a2, ka), (b1, b2, kb) = outs
    assert np.array_equal(a1.tokens, b1.tokens) and np.array_equal(a2.tokens, b2.tokens)
    np.testing.assert_allclose(a1.plain_logprobs, b1.plain_logprobs, atol=1e-5)
    np.testing.assert_allclose(a2.logprobs, b2.logprobs, atol=1e-5)
    np.testing.assert_allclose(ka, kb, atol=1e-5)
    assert shared._prefill_shared._cache_size() == 1 and shared._prefill._cache_size() == 0
    # no common prefix (or a short one): the plain path
    shared.start(PARAMS, PROMPTS)
    assert shared._prefill._cache_size() == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fresh_prefill_equals_prefill_over_the_whole_cache(dtype):
    """A prefill into an empty cache attends to the chunk's own keys, causally and block by block
    (`forward_chunk(fresh=True)`), instead of to every cache slot: the same logits (float32: to 1e-5;
    bf16: the same values in another summation order) and the same caches, for right-padded rows."""
    from mtr_jax.sampling.decode import forward_chunk

    cfg = tiny_config(dtype=dtype)
    params = qwen2.init_params(cfg, jax.random.key(3), std=0.2)
    B, C, S = 3, 40, 56
    tokens = jnp.asarray(np.random.RandomState(0).randint(1, cfg.vocab_size, (B, C)), jnp.int32)
    lengths = jnp.asarray([40, 23, 7], jnp.int32)
    shape = (cfg.num_hidden_layers, B, cfg.num_key_value_heads, S, cfg.head_dim)
    z = jnp.zeros(shape, cfg.compute_dtype)
    end = jnp.zeros((B,), jnp.int32)
    run = lambda fresh: forward_chunk(params, cfg.replace(attention_block=8), z, z, end, tokens, lengths, True, fresh=fresh)
    (lf, kf, vf, ef), (lw, kw, vw, ew) = run(True), run(False)
    # layer 0's keys and values are bit-identical; later layers' follow the attention's rounding
    np.testing.assert_array_equal(np.asarray(kf[0]), np.asarray(kw[0]))
    np.testing.assert_array_equal(np.asarray(vf[0]), np.asarray(vw[0]))
    np.testing.assert_array_equal(np.asarray(ef), np.asarray(ew))
    tol = 1e-5 if dtype == "float32" else 2e-2
    f32 = lambda a: np.asarray(a).astype(np.float32)
    np.testing.assert_allclose(f32(kf), f32(kw), atol=tol, rtol=tol)
    np.testing.assert_allclose(f32(vf), f32(vw), atol=tol, rtol=tol)
    valid = np.arange(C)[None, :] < np.asarray(lengths)[:, None]  # padded queries are never read
    np.testing.assert_allclose(np.asarray(lf)[valid], np.asarray(lw)[valid], atol=tol, rtol=tol)
