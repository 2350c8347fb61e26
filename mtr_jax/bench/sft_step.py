"""One process, ours only: time and peak host memory (RSS) of the real SFT train step.

`python -m mtr_jax.bench.sft_step --preset qwen2.5-0.5b --batch 4 --seq 1024 --dtype bfloat16
[--remat] [--label-share 0.25]` runs the trainer's own step (`train.step.make_train_step` with the
SFT loss: the LM head only at label positions, vocabulary-chunked), float32 master weights and
AdamW, on random tokens whose label mask covers `--label-share` of each row (assistant tokens are
15-30% of an MTR trace), and prints one JSON object. Peak RSS is read from the kernel
(`ru_maxrss`), so it counts everything the process held, weights and optimiser state included. A
process of its own: a peer in the same process would count in the peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen2.5-0.5b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--attention-block", type=int, default=0)
    ap.add_argument("--label-share", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lora-rank", type=int, default=0, help="> 0: LoRA on all projections, bf16 frozen base")
    ap.add_argument("--int8", action="store_true", help="with --lora-rank: QLoRA (int8 base)")
    ap.add_argument("--mu-dtype", default="float32", help="AdamW first moment: float32 | bfloat16")
    a = ap.parse_args(argv)

    from mtr_jax.bench import bench_model
    from mtr_jax.config import OptimConfig
    from mtr_jax.train import losses
    from mtr_jax.train.optim import make_optimizer
    from mtr_jax.train.step import make_train_step, split_micro

    from mtr_jax.config import LoraConfig
    from mtr_jax.model import lora

    cfg, params, weights = bench_model(a.preset, "bfloat16" if a.lora_rank else "float32", a.dtype)
    cfg = cfg.replace(remat=a.remat, scan_layers=a.remat, attention_block=a.attention_block)
    frozen = ()
    if a.lora_rank:
        lc = LoraConfig(enabled=True, rank=a.lora_rank, base_quant="int8" if a.int8 else "none")
        cfg, base, params = lora.prepare(lc, cfg, params)
        frozen = (base,)
    tx, _ = make_optimizer(OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant", mu_dtype=a.mu_dtype), 10)
    opt_state = jax.jit(tx.init)(params)

    def loss_num(p, mb, *base):
        num, den = losses.sft_loss_num(lora.with_adapters(base[0], p) if base else p, cfg, mb)
        return num, {"tokens": den}

    step = make_train_step(loss_num, losses.sft_denominator, tx)
    rng = np.random.default_rng(0)
    B, T = a.batch, a.seq
    tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    # assistant spans: runs of 48 labelled tokens spread over the row
    lm = np.zeros((B, T), bool)
    span = 48
    n_spans = max(1, int(a.label_share * T / span))
    for b in range(B):
        for s in np.linspace(span, T - span, n_spans).astype(int):
            lm[b, s : s + span] = True
    batch = {"tokens": tokens, "loss_mask": lm, "segment_ids": np.ones((B, T), np.int32),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}
    mb = split_micro(batch, 1)
    mb["label_idx"], mb["label_w"] = losses.label_index(mb["loss_mask"], mb["segment_ids"])
    mb = {k: jnp.asarray(v) for k, v in mb.items()}
    times, losses_seen = [], []
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, mb, *frozen).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    xla_peak = ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
    for i in range(a.steps):
        t0 = time.perf_counter()
        params, opt_state, m = compiled(params, opt_state, mb, *frozen)
        losses_seen.append(float(m["loss"]))
        times.append(time.perf_counter() - t0)
        print(f"[sft_step] step {i}: {times[-1]:.2f}s loss {losses_seen[-1]:.4f}", file=sys.stderr, flush=True)
    step_s = float(np.median(times))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "workload": "sft_step", "preset": a.preset, "weights": weights, "batch": B, "seq": T, "dtype": a.dtype,
        "lora_rank": a.lora_rank, "int8_base": a.int8, "remat": a.remat, "attention_block": a.attention_block, "label_share": round(float(lm.mean()), 3),
        "mu_dtype": a.mu_dtype, "xla": {k: round(getattr(ma, k) / 1e9, 2) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")},
        "step_s": round(step_s, 3), "tokens_per_s": round(B * T / step_s, 1),
        "peak_rss_GB": round(peak / 1e9, 2), "xla_step_peak_GB": round(xla_peak / 1e9, 2), "compile_s": round(compile_s, 1), "losses": [round(x, 4) for x in losses_seen],
        "device": str(jax.devices()[0]),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
