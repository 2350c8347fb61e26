"""`mtr bench forward`: training-step throughput (forward + backward of the token-mean cross-entropy,
tokens/s) of a ~40M-parameter Qwen2 (hidden 512, 8 layers, 8 heads, 2 KV heads, MLP 1408,
vocab 32000), batch 8 x 256, ours (jitted JAX) vs transformers' PyTorch Qwen2ForCausalLM (eager)
on the same shape, batch and thread count, in float32 and bfloat16, in the same run.

bfloat16: ours keeps float32 master weights and computes in bf16 with f32 accumulation (what
training does); the peer runs the whole model in bf16 (`model.to(torch.bfloat16)`), its fastest
CPU setting. MFU = model FLOPs per second / the measured peak of a large matmul in that dtype.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtr_jax.errors import MtrError
from mtr_jax.model import qwen2

SHAPE = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False,
)
BATCH, SEQ = 8, 256
# at a real preset ours runs as the shipped Qwen configs train: remat + scan over layers (the peer,
# eager PyTorch, keeps every activation: more memory, no recomputation)
REMAT_AT_PRESET = True
# block-causal attention at a preset (the peer's SDPA skips the masked upper triangle too): at
# 4 x 1024 it cuts the bf16 step on a 2-core AMX CPU from 39 s to 30 s
ATTENTION_BLOCK = 128


def _log(msg: str) -> None:
    print(f"[bench forward] {msg}", file=sys.stderr, flush=True)


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _time_pair(ours, peer, warmup: int, iters: int) -> tuple[float, float]:
    """Median seconds per step of each, timed alternately (ours, peer, ours, ...) so a change in
    machine load during the run hits both sides alike."""
    for _ in range(warmup):
        ours()
        peer()
    t_ours, t_peer = [], []
    for _ in range(iters):
        for fn, ts in ((ours, t_ours), (peer, t_peer)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return float(np.median(t_ours)), float(np.median(t_peer))


def step_flops(cfg: qwen2.Qwen2Config, batch: int, seq: int) -> float:
    """Matmul FLOPs of forward + backward (3x forward) for one batch; attention over all T keys
    (both implementations compute the full score matrix, masked)."""
    E, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    Q = cfg.num_attention_heads * cfg.head_dim
    K = cfg.num_key_value_heads * cfg.head_dim
    per_token_layer = 2 * (E * Q + 2 * E * K + Q * E + 3 * E * I) + 2 * 2 * seq * Q
    fwd = batch * seq * (L * per_token_layer + 2 * E * V)
    return 3.0 * fwd


def matmul_peak(dtype: str, n: int | None = None, iters: int = 5) -> float:
    """FLOP/s of an n x n x n jnp matmul in `dtype` (f32 accumulation), best of `iters`. n: 2048 on
    a CPU, 8192 on an accelerator (a smaller product does not fill a GPU)."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    dt = qwen2.DTYPES[dtype]
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dt)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def ours_step(cfg: qwen2.Qwen2Config, params, tokens):
    from mtr_jax.train import losses

    def loss_fn(p, tokens):
        # the training loss (train/losses.py): token-mean cross-entropy through the
        # vocabulary-chunked head, so no [B, T, V] logits tensor exists
        logp, _ = losses.token_logprobs(p, cfg, tokens)
        return -logp.mean()

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    return lambda: float(jax.block_until_ready(grad_fn(params, tokens))[0])


def peer_step(cfg: qwen2.Qwen2Config, params, tokens, dtype: str, device):
    import torch

    from mtr_jax.model.hf_io import torch_model

    model = torch_model(params, cfg).to(device)  # same weights as ours
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.train()
    ids = torch.from_numpy(np.asarray(tokens).astype(np.int64)).to(device)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return float(out.loss.detach())  # .item() waits for the device

    step.attn_implementation = getattr(model.config, "_attn_implementation", "?")
    return step


def run(args) -> dict:
    dtypes = [args.dtype] if getattr(args, "dtype", None) else ["float32", "bfloat16"]
    for d in dtypes:
        if d not in ("float32", "bfloat16"):
            raise MtrError(f"--dtype {d}: expected float32 or bfloat16")
    quick = bool(getattr(args, "quick", False))
    warmup, iters = (1, 3) if quick else (2, 7)
    if jax.default_backend() != "cpu":  # steps take milliseconds there: more of them for a stable median
        warmup, iters = 5, 30
    threads = _threads()
    import torch

    from mtr_jax.bench import matmul_precision, torch_device

    torch.set_num_threads(threads)
    tdev = torch_device()
    dev = jax.devices()[0]
    device = f"{dev.platform}:{getattr(dev, 'device_kind', dev.platform)} x{jax.device_count()}, {threads} threads"
    preset = getattr(args, "preset", None)
    batch, seq = (4, 1024) if preset else (BATCH, SEQ)
    batch, seq = getattr(args, "batch", None) or batch, getattr(args, "prompt", None) or seq
    if preset and jax.default_backend() == "cpu":  # a real-shape step takes a minute here
        warmup, iters = 1, 2
    vocab = SHAPE["vocab_size"]
    if preset:
        from mtr_jax.model.presets import load_preset

        vocab = load_preset(preset).vocab_size
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, vocab, (batch, seq)), jnp.int32)
    res: dict = {"workload": "forward", "unit": "tokens/s", "device": device}
    for dtype in dtypes:
        with matmul_precision(dtype):
            res[dtype] = _measure(dtype, tokens, tdev, warmup, iters, preset, getattr(args, "remat_policy", None))
    res["shape"] = res[dtypes[0]].pop("shape")
    head = res[dtypes[0]]  # headline: float32 (or the one --dtype asked for); both are in the extras
    res.update(ours=head["ours"], peer=head["peer"], ratio=head["ratio"], headline_dtype=dtypes[0],
               peer_name=f"transformers {__import__('transformers').__version__} PyTorch {torch.__version__} eager "
                         f"Qwen2ForCausalLM on {tdev.type}")
    return res


def _measure(dtype: str, tokens, tdev, warmup: int, iters: int, preset: str | None = None,
             remat_policy: str | None = None) -> dict:
    BATCH, SEQ = tokens.shape
    if preset:
        from mtr_jax.bench import bench_model

        cfg, params, weights = bench_model(preset, "float32", dtype)
        policy = remat_policy or "full"
        remat = REMAT_AT_PRESET and policy != "none"
        cfg = cfg.replace(remat=remat, scan_layers=REMAT_AT_PRESET, remat_policy=policy if remat else "full",
                          attention_block=ATTENTION_BLOCK)
    else:
        cfg = qwen2.Qwen2Config(**SHAPE, dtype=dtype, param_dtype="float32")
        # std 0.1 (not 0.02) so the loss is far from log(V) and the loss check below means something
        params = jax.jit(lambda k: qwen2.init_params(cfg, k, std=0.1))(jax.random.key(0))
        weights = "random"
    flops = step_flops(cfg, BATCH, SEQ)
    _log(f"{dtype}: matmul peak")
    peak = matmul_peak(dtype)
    ours = ours_step(cfg, params, tokens)
    peer = peer_step(cfg, params, tokens, dtype, tdev)
    loss_diff = abs(ours() - peer())  # same weights and batch: the same workload, not just the same shape
    _log(f"{dtype}: {warmup} warm-up + {iters} timed steps each, alternating ours / peer")
    t_ours, t_peer = _time_pair(ours, peer, warmup, iters)
    _log(f"{dtype}: ours {BATCH * SEQ / t_ours:.0f} tokens/s, peer {BATCH * SEQ / t_peer:.0f} tokens/s")
    return {
        "ours": BATCH * SEQ / t_ours,
        "peer": BATCH * SEQ / t_peer,
        "ratio": t_peer / t_ours,
        "ours_step_s": t_ours,
        "peer_step_s": t_peer,
        "matmul_peak_gflops": peak / 1e9,
        "ours_mfu": flops / t_ours / peak,
        "peer_mfu": flops / t_peer / peak,
        "loss_abs_diff": loss_diff,
        "peer_attention": peer.attn_implementation,
        "weights": weights,
        "remat": f"{cfg.remat_policy}" if cfg.remat else "none",
        "attention_block": cfg.attention_block,
        "shape": {**{k: getattr(cfg, k) for k in SHAPE}, "batch": int(BATCH), "seq": int(SEQ)},
    }
