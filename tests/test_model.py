"""Qwen2 maths against transformers' PyTorch Qwen2ForCausalLM (the oracle), the KV cache and
packing against the full forward (itself checked against the oracle)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_oracle import hf_logits, make_hf_model
from mtr_jax.model import qwen2
from mtr_jax.model.hf_io import load_hf
from util import tiny_config


@pytest.mark.parametrize(
    "kv_heads,tied", [(4, True), (2, False), (1, True)], ids=["gqa1-tied", "gqa2-untied", "gqa4-tied"]
)
def test_logits_match_transformers(tmp_path, kv_heads, tied):
    hf = make_hf_model(tmp_path, kv_heads=kv_heads, tied=tied)
    model, cfg = load_hf(tmp_path)
    assert cfg.num_attention_heads // cfg.num_key_value_heads == 4 // kv_heads
    assert ("lm_head" in model.params()) == (not tied)
    rng = np.random.RandomState(1)

    ids = rng.randint(0, 256, (2, 12))
    diff = np.abs(np.asarray(model(ids)) - hf_logits(hf, ids)).max()
    assert diff <= 1e-4, diff

    # left-padded batch: same mask and position ids to both; compare valid positions only
    mask = np.ones((3, 12), np.int64)
    mask[1, :5] = 0
    mask[2, :9] = 0
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    ids = rng.randint(0, 256, (3, 12))
    ours = np.asarray(model(ids, positions=jnp.asarray(pos), attention_mask=jnp.asarray(mask)))
    ref = hf_logits(hf, ids, attention_mask=mask, position_ids=pos)
    valid = mask.astype(bool)
    diff = np.abs(ours[valid] - ref[valid]).max()
    assert diff <= 1e-4, diff
    assert np.isfinite(ours).all()  # padding rows stay finite too


def test_scan_remat_bf16_match_unrolled():
    cfg = tiny_config()
    params = qwen2.init_params(cfg, jax.random.key(0))
    ids = np.random.RandomState(0).randint(0, 256, (2, 16))
    fwd = jax.jit(qwen2.forward, static_argnums=1)
    ref = np.asarray(fwd(params, cfg, ids))
    scanned = np.asarray(fwd(params, cfg.replace(scan_layers=True, remat=True), ids))
    assert np.abs(ref - scanned).max() <= 1e-5
    bf16 = np.asarray(fwd(params, cfg.replace(dtype="bfloat16"), ids))
    assert bf16.dtype == np.float32
    assert 0 < np.abs(ref - bf16).max() <= 5e-2 * np.abs(ref).max()  # bf16 compute, not silently f32


def test_kv_cache_prefill_then_16_decode_steps_equals_full_forward():
    cfg = tiny_config(num_key_value_heads=1)
    params = qwen2.init_params(cfg, jax.random.key(3), std=0.1)
    rng = np.random.RandomState(2)
    B, P, N = 3, 8, 16
    lens = np.array([8, 5, 3])
    prompts = rng.randint(1, 256, (B, P))
    new = rng.randint(1, 256, (B, N))
    extend = jax.jit(lambda p, c, t, l: qwen2.extend(p, cfg, c, t, l))
    cache = qwen2.init_cache(cfg, B, 32, dtype=jnp.float32)
    logits0, cache = extend(params, cache, jnp.asarray(prompts), jnp.asarray(lens))
    steps = []
    for t in range(N):
        lg, cache = extend(params, cache, jnp.asarray(new[:, t : t + 1]), jnp.ones((B,), jnp.int32))
        steps.append(np.asarray(lg[:, 0]))
    steps = np.stack(steps, 1)  # [B, N, V]
    assert np.asarray(cache["end"]).tolist() == (lens + N).tolist()
    # oracle: one full forward over each row's whole sequence (right-padded, segment 0 = padding)
    seqs = np.zeros((B, P + N), np.int32)
    seg = np.zeros((B, P + N), np.int32)
    for b in range(B):
        seqs[b, : lens[b] + N] = np.concatenate([prompts[b, : lens[b]], new[b]])
        seg[b, : lens[b] + N] = 1
    full = np.asarray(jax.jit(qwen2.forward, static_argnums=1)(params, cfg, seqs, None, seg))
    for b in range(B):
        assert np.abs(np.asarray(logits0)[b, : lens[b]] - full[b, : lens[b]]).max() <= 1e-4
        assert np.abs(steps[b] - full[b, lens[b] : lens[b] + N]).max() <= 1e-4


def test_packed_row_equals_each_sequence_alone():
    cfg = tiny_config()
    params = qwen2.init_params(cfg, jax.random.key(4), std=0.1)
    rng = np.random.RandomState(3)
    a, b = rng.randint(1, 256, 5), rng.randint(1, 256, 7)
    # row 0: a and b packed; rows 1, 2: each alone (right-padded)
    rows = np.zeros((3, 16), np.int32)
    seg = np.zeros((3, 16), np.int32)
    pos = np.zeros((3, 16), np.int32)
    rows[0, :12], seg[0, :12], pos[0, :12] = np.concatenate([a, b]), [1] * 5 + [2] * 7, list(range(5)) + list(range(7))
    rows[1, :5], seg[1, :5], pos[1, :5] = a, 1, range(5)
    rows[2, :7], seg[2, :7], pos[2, :7] = b, 1, range(7)
    fwd = jax.jit(qwen2.forward, static_argnums=1)
    out = np.asarray(fwd(params, cfg, rows, pos, seg))
    assert np.abs(out[0, :5] - out[1, :5]).max() <= 1e-5
    assert np.abs(out[0, 5:12] - out[2, :7]).max() <= 1e-5
    # with one segment the second sequence would see the first: the check above is not vacuous
    joined = np.asarray(fwd(params, cfg, rows, pos, (seg > 0).astype(np.int32)))
    assert np.abs(joined[0, 5:12] - out[2, :7]).max() > 1e-3


def test_presets_match_official_parameter_counts():
    from mtr_jax.config import ModelConfig
    from mtr_jax.errors import MtrError
    from mtr_jax.model.presets import load_preset, resolve_model_config

    def count(cfg):
        specs = qwen2.param_specs(cfg)
        leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, tuple) and isinstance(x[1], tuple))
        return sum(int(np.prod(shape)) for shape, _ in leaves)

    # the totals Hugging Face reports for the Qwen2.5 checkpoints (safetensors metadata)
    official = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-3b": 3_085_938_688, "qwen2.5-7b": 7_615_616_512}
    for name, n in official.items():
        assert count(load_preset(name)) == n, name
    cfg = resolve_model_config(ModelConfig(preset="tiny", arch={"num_hidden_layers": 3}, dtype="bfloat16", scan_layers=True))
    assert (cfg.num_hidden_layers, cfg.dtype, cfg.scan_layers, cfg.param_dtype) == (3, "bfloat16", True, "float32")
    with pytest.raises(MtrError, match="model.arch: unknown Qwen2Config fields \\['hiden_size'\\]"):
        resolve_model_config(ModelConfig(arch={"hiden_size": 8}))
    with pytest.raises(MtrError, match="model.preset 'qwen9'"):
        resolve_model_config(ModelConfig(preset="qwen9"))


def test_bf16_gradients_track_float32():
    """bf16 compute runs its backward matmuls in bf16 (custom VJP); the gradients must still be
    the float32 gradients up to bf16 rounding, for every parameter."""
    cfg = tiny_config(tie_word_embeddings=False)
    params = qwen2.init_params(cfg, jax.random.key(5), std=0.1)
    ids = np.random.RandomState(6).randint(0, 256, (2, 16))

    def loss(p, c):
        lp = jax.nn.log_softmax(qwen2.forward(p, c, ids)[:, :-1], -1)
        return -jnp.take_along_axis(lp, ids[:, 1:, None], -1).mean()

    g32 = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg)
    g16 = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg.replace(dtype="bfloat16"))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g32), jax.tree_util.tree_leaves(g16)):
        assert b.dtype == a.dtype == jnp.float32, path
        rel = float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(a) + 1e-12))
        assert rel < 3e-2, (path, rel)


def test_block_causal_training_attention_equals_dense():
    """Qwen2Config.attention_block > 0 computes the training attention block by block, skipping the masked
    upper triangle (faster at long T); the logits must not change."""
    import jax
    import numpy as np

    from mtr_jax.model import qwen2
    from util import tiny_config

    cfg = tiny_config()
    params = qwen2.init_params(cfg, jax.random.PRNGKey(0), std=0.1)
    toks = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 256)).astype(np.int32)
    seg = np.ones((2, 256), np.int32)
    seg[1, 100:] = 2
    dense = np.asarray(qwen2.forward(params, cfg, toks, segment_ids=seg))
    blocked = np.asarray(qwen2.forward(params, cfg.replace(attention_block=64), toks, segment_ids=seg))
    assert np.abs(dense - blocked).max() <= 1e-5
