"""Int8 sampling copies (model/quant.py): the matmuls against NumPy, the weight-only model
against transformers on the dequantized weights, the sampler's paths against the quantized
model's own forward, LoRA merged before quantizing, GRPO rollouts from an int8 copy, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtr_jax.errors import MtrError
from mtr_jax.model import lora, qwen2, quant
from mtr_jax.sampling import Sampler, SamplingParams
from util import REPO, tiny_config

CFG = tiny_config()
PARAMS = qwen2.init_params(CFG, jax.random.key(0), std=0.15)
GREEDY = SamplingParams(greedy=True)


def _np_quantize(w):
    """Independent of quant.py: symmetric int8, one scale per output column."""
    w = np.asarray(w, np.float64)
    s = np.maximum(np.abs(w).max(axis=-2, keepdims=True), 1e-12) / 127.0
    return np.clip(np.rint(w / s), -127, 127).astype(np.int64), s


def test_int8_matmuls_equal_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 96)).astype(np.float32)
    w = rng.standard_normal((96, 40)).astype(np.float32) * 0.05
    q = quant.quantize_weight(jnp.asarray(w))
    wq, ws = _np_quantize(w)
    assert np.array_equal(np.asarray(q["int8"], np.int64), wq)
    np.testing.assert_allclose(np.asarray(q["scale"]), ws, rtol=1e-6)
    # weight-only: x @ (int8 * scale)
    got = np.asarray(quant.int8_matmul(jnp.asarray(x), q, False, jnp.float32))
    np.testing.assert_allclose(got, x.astype(np.float64) @ (wq * ws), rtol=1e-5, atol=1e-5)
    # W8A8: each row of x quantized by its absmax; integer products summed exactly
    xs = np.maximum(np.abs(x.astype(np.float64)).max(-1, keepdims=True), 1e-12) / 127.0
    xq = np.clip(np.rint(x / xs), -127, 127).astype(np.int64)
    want = (xq @ wq) * xs * ws
    got = np.asarray(quant.int8_matmul(jnp.asarray(x), q, True, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # and it is an approximation of the float matmul, not something else
    ref = x @ w
    assert np.max(np.abs(got - ref)) < 0.03 * np.max(np.abs(ref))


@pytest.mark.parametrize("tied", [True, False])
def test_weight_only_int8_equals_transformers_on_dequantized_weights(tied):
    import torch

    from mtr_jax.model.hf_io import torch_model

    cfg = tiny_config(tie_word_embeddings=tied)
    params = qwen2.init_params(cfg, jax.random.key(1), std=0.15)
    qp, qcfg = quant.for_sampling(params, cfg, "int8")
    assert qp["lm_head"]["int8"].dtype == jnp.int8 and not qcfg.tie_word_embeddings
    assert all(qp["layers"][k]["int8"].dtype == jnp.int8 for k in quant.PROJECTIONS)
    # what the int8 copy means, in plain float32 weights, run by transformers
    deq = lora.dequantized(qp)
    deq["lm_head"] = lora.dequantize(qp["lm_head"])
    hf = torch_model(deq, qcfg)
    toks = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():
        want = hf(torch.tensor(toks)).logits.numpy()
    got = np.asarray(qwen2.forward(qp, qcfg, jnp.asarray(toks, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    # and the int8 model is close to, not equal to, the float one
    full = np.asarray(qwen2.forward(params, cfg, jnp.asarray(toks, jnp.int32)))
    err = np.max(np.abs(got - full))
    assert 0 < err < 0.05 * np.max(np.abs(full))


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic"])
def test_sampler_on_int8_copy_equals_its_own_forward(mode):
    """Prefill + decode (KV cache, unstacked layers) of the quantized copy pick the argmax of the
    quantized model's full forward at every step (teacher forcing on the generated tokens)."""
    qp, qcfg = quant.for_sampling(PARAMS, CFG, mode)
    rng = np.random.RandomState(2)
    prompts = [list(map(int, rng.randint(1, CFG.vocab_size, n))) for n in (7, 19, 12)]
    s = Sampler(qcfg, cache_len=128, eos_ids=[])
    st = s.start(qp, prompts)
    st, out = s.generate(qp, st, max_new_tokens=16, sampling=GREEDY, key=0)
    for i, p in enumerate(prompts):
        seq = p + list(map(int, out.tokens[i]))
        logits = np.asarray(qwen2.forward(qp, qcfg, jnp.asarray([seq], jnp.int32)))[0]
        want = logits[len(p) - 1:len(seq) - 1].argmax(-1)
        assert np.array_equal(out.tokens[i], want), (mode, i)
        lp = jax.nn.log_softmax(jnp.asarray(logits[len(p) - 1:len(seq) - 1]), -1)
        np.testing.assert_allclose(out.plain_logprobs[i], np.take_along_axis(np.asarray(lp), want[:, None], 1)[:, 0],
                                   atol=2e-4)


def test_lora_adapters_are_merged_before_quantizing():
    ad = lora.init_adapters(CFG, list(lora.TARGETS.values()), 4, jax.random.key(3))
    ad = jax.tree_util.tree_map(lambda a: a + 0.05, ad)  # b = 0 would make the adapters a no-op
    with_ad = lora.with_adapters(PARAMS, ad)
    cfg = CFG.replace(lora_alpha=8.0)
    qp, qcfg = quant.for_sampling(with_ad, cfg, "int8")
    assert not any(lora.SEP in k for k in qp["layers"])
    toks = jnp.asarray(np.random.RandomState(4).randint(0, CFG.vocab_size, (2, 9)), jnp.int32)
    want = np.asarray(qwen2.forward(with_ad, cfg, toks))
    got = np.asarray(qwen2.forward(qp, qcfg, toks))
    base = np.asarray(qwen2.forward(PARAMS, cfg, toks))
    assert np.max(np.abs(got - want)) < 0.05 * np.max(np.abs(want))
    assert np.max(np.abs(got - want)) < 0.2 * np.max(np.abs(base - want))  # the adapters are in the copy


def test_bad_mode_is_one_error():
    with pytest.raises(MtrError, match="eval.quant='int4'"):
        quant.validate("int4", "eval.quant")
    with pytest.raises(MtrError, match="expected one of none, int8, int8-dynamic"):
        quant.for_sampling(PARAMS, CFG, "fp8")


def test_grpo_rollouts_from_int8_copy_log_the_gap(tmp_path):
    from test_train import GRPO_SETUP

    ns = {}
    exec(GRPO_SETUP, ns)
    run = str(tmp_path / "g")
    cfg, mc, params, tok, train, actor, tm = ns["grpo_setting"](run, steps=1, extra=(
        "grpo.rollout_quant=int8-dynamic", "grpo.mu=1", "grpo.minibatches=1", "grpo.beta=0"))
    from mtr_jax.train.grpo import train_grpo

    train_grpo(cfg, mc, params, tok, train, actor, tm, run, progress=False)
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    # on-policy: the trainer's float32 log-probs against the int8 sampler's: non-zero, small
    assert 0 < rows[-1]["logprob_gap"] < 0.5, rows[-1]["logprob_gap"]


def test_bad_quant_setting_at_cli_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mtr_jax.cli", "eval", "--config", "configs/grpo-qwen2.5-0.5b.yaml",
                        "eval.quant=int4", f"run.out_dir={tmp_path}", "model.init_from=", "model.tokenizer="],
                       capture_output=True, text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "eval.quant='int4'" in lines[0], r.stderr


def test_bench_quant_case_reports_speed_and_accuracy():
    from types import SimpleNamespace

    from mtr_jax.bench import sample

    r = sample.run(SimpleNamespace(quick=True, dtype="float32", case="quant", quant="int8-dynamic", preset=None,
                                   batch=4, new=8, prompt=16))
    assert r["case"] == "quant" and r["ratio"] > 0 and r["shape"]["quant"] == "int8-dynamic"
    equal, total = map(int, r["greedy_tokens_equal_before_first_divergence"].split("/"))
    assert total == 32 and equal >= 16  # int8 follows the float model for most tokens
    assert 0 < r["mean_abs_logprob_gap"] < 0.1
