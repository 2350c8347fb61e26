"""Int8 weights for sampling: a quantized copy of the policy, made once per eval or GRPO rollout.

Modes (`eval.quant`, `grpo.rollout_quant`, `mtr bench sample --case quant --quant MODE`):
- `int8`: weight-only. Every projection and the LM head are stored as int8 with one float32 scale
  per output column (symmetric absmax over the input dimension); each matmul dequantizes to the
  compute dtype. It halves the bytes a bandwidth-bound decode step reads where XLA fuses the
  dequantization into the matmul (GPU, TPU). XLA:CPU does not fuse it and runs slower than bf16.
- `int8-dynamic`: W8A8 with dynamic per-row activation scales (qwix's dynamic-range quantization;
  LLM.int8() without its outlier split). Each matmul input row is quantized to int8 by its own
  absmax and the matmul runs int8 x int8 -> int32. On a 2-core AVX2 CPU at decode batch sizes
  this runs at ~1.3-1.5x XLA:CPU's bf16 matmul.
Either way the trainer keeps the unquantized weights. GRPO logs the sampler-vs-trainer log-prob
gap (`logprob_gap`) that the quantization adds.

Embeddings stay in their dtype (a lookup reads only the batch's rows). A tied head gets its own
int8 copy `lm_head` (embed transposed), so the sampling config unties it. LoRA adapters are
merged before quantizing, and an int8 QLoRA base is dequantized first.

Why not qwix: it intercepts the dot_generals of Flax modules by module path, and our forward is
one pure function over stacked arrays. So a quantized model here is a plain pytree transform,
the same way the QLoRA base is built (model/lora.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mtr_jax.config import QUANT_MODES
from mtr_jax.errors import MtrError

PROJECTIONS = ("q_w", "k_w", "v_w", "o_w", "gate_w", "up_w", "down_w")


def validate(mode: str, where: str) -> None:
    if mode not in QUANT_MODES:
        raise MtrError(f"{where}={mode!r}: expected one of {', '.join(QUANT_MODES)}")


def quantize_weight(w) -> dict:
    """w [..., in, out] -> {"int8": int8 [..., in, out], "scale": float32 [..., 1, out]}: symmetric,
    one scale per output column (w ~= int8 * scale)."""
    w = w.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(w), axis=-2, keepdims=True), 1e-12) / 127.0
    return {"int8": jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), "scale": scale}


def sampling_config(cfg, mode: str):
    """The model config a quantized copy runs under (an untied head; W8A8 for int8-dynamic)."""
    validate(mode, "quant")
    if mode == "none":
        return cfg
    return cfg.replace(tie_word_embeddings=False, quant_activations=(mode == "int8-dynamic"))


@functools.partial(jax.jit, static_argnames=("tied", "alpha"))
def _quantize(params, tied: bool, alpha: float):
    from mtr_jax.model import lora

    params = lora.merged(params, alpha)  # adapters folded in, an int8 QLoRA base dequantized
    layers = dict(params["layers"])
    for k in PROJECTIONS:
        layers[k] = quantize_weight(layers[k])
    head = params["embed"].T if tied else params["lm_head"]
    return dict(params, layers=layers, lm_head=quantize_weight(head))


def for_sampling(params, cfg, mode: str):
    """(params, cfg) for a sampler: unchanged for `none`, else an int8 copy of the weights (one
    jitted pass over them) and `sampling_config(cfg, mode)`."""
    qcfg = sampling_config(cfg, mode)
    if mode == "none":
        return params, cfg
    return _quantize(params, tied=bool(cfg.tie_word_embeddings), alpha=float(cfg.lora_alpha)), qcfg


def int8_matmul(x, w: dict, quant_activations: bool, compute_dtype):
    """x [..., in] @ (w["int8"] * w["scale"]) -> float32. W8A8 (`quant_activations`): x's rows are
    quantized to int8 by their absmax and the matmul accumulates int8 x int8 in int32 (exact up to
    127 * 127 * 2**17 terms). Otherwise the weights are dequantized inside the matmul."""
    from mtr_jax.model.qwen2 import mp_einsum

    lead = "abcd"[: x.ndim - 1]
    spec = f"{lead}e,ef->{lead}f"
    scale = w["scale"].reshape(w["scale"].shape[-1]).astype(jnp.float32)
    if not quant_activations:
        return mp_einsum(spec, x, w["int8"], compute_dtype) * scale
    x32 = x.astype(jnp.float32)
    xs = jnp.maximum(jnp.max(jnp.abs(x32), axis=-1, keepdims=True), 1e-12) / 127.0
    xq = jnp.clip(jnp.round(x32 / xs), -127, 127).astype(jnp.int8)
    acc = jnp.einsum(spec, xq, w["int8"], preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * xs * scale
