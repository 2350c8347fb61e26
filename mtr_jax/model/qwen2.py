"""Qwen2 / Qwen2.5 decoder in Flax NNX, matching Hugging Face `Qwen2ForCausalLM` numerically.

Structure. The maths is one pure function, `forward(params, config, tokens, ...)`, over a plain
nested dict of arrays (the same dict the NNX module holds as `nnx.Param`s). Layers are stored
stacked (leading `layers` axis) so the decoder is either `lax.scan` over layers (fast compile for
28-layer models) or an unrolled Python loop; `jax.checkpoint` wraps a layer when `remat` is set.

Attention masking is by segment ids: a token attends to earlier tokens of its own segment, and
segment 0 is padding. Packed SFT rows, padded batches and plain rows all go through that one rule.

The KV cache (`init_cache` / `extend`) keeps, per row, how many slots are filled (`cache["end"]`);
a chunk of C new tokens per row is written at slots end..end+C-1 with positions end..end+C-1, so
prefill (end=0), one decode step (C=1) and appending a tool response (C>1, rows of different
lengths) are the same function.

Dtypes: `param_dtype` is what is stored; `dtype` is the compute dtype; every matmul accumulates in
float32 (`preferred_element_type`), norms and softmax run in float32. On an x86 CPU without bf16 matmul
hardware a large bf16 matmul runs as a float32 one on the exact upcasts (`_lp_dot`: faster there).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import platform
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from mtr_jax.errors import MtrError
from mtr_jax.model.quant import int8_matmul

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# what a rematerialised layer saves for its backward pass (`model.remat_policy`)
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@dataclass
class Qwen2Config:
    """Field names as in Hugging Face `Qwen2Config`; the last four are ours (not written to HF)."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    # ours
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype
    remat: bool = False
    remat_policy: str = "full"  # full | dots (see REMAT_POLICIES)
    scan_layers: bool = False
    # query block of the full-sequence (training) attention; 0 = dense. 128 skips the masked upper
    # triangle (a T=768 CPU train step ~1.5x faster); `mtr plan`'s activation model is fitted to dense
    attention_block: int = 0
    lora_alpha: float = 16.0  # LoRA scale alpha / r, applied where params hold adapters (model/lora.py)
    lora_dropout: float = 0.0  # on the adapters' input, only where a training step supplies keys (lora.with_dropout)
    quant_activations: bool = False  # int8 weights run W8A8 (int8 x int8 matmuls; sampling only, model/quant.py)

    HF_FIELDS = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps",
        "tie_word_embeddings", "head_dim", "bos_token_id", "eos_token_id",
    )

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise MtrError(f"Qwen2Config.{name}={getattr(self, name)!r}: expected one of {sorted(DTYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise MtrError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    def __hash__(self):
        # lets a config be a static argument of jax.jit; configs are never mutated (use .replace)
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def storage_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **kw) -> "Qwen2Config":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config") -> "Qwen2Config":
        """Read a transformers 4 or 5 `config.json` dict (v5 keeps rope_theta in rope_parameters)."""
        model_type = d.get("model_type")
        if model_type not in ("qwen2", None):
            raise MtrError(f"{source}: model_type '{model_type}' is not qwen2 (Qwen2/Qwen2.5 only)")
        archs = d.get("architectures") or []
        if archs and not any(a.startswith("Qwen2") for a in archs):
            raise MtrError(f"{source}: architectures {archs} are not Qwen2ForCausalLM")
        kw = {k: d[k] for k in cls.HF_FIELDS if k in d}
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if "rope_theta" not in kw and isinstance(rope, dict) and "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type not in ("default", None):
            raise MtrError(f"{source}: rope type '{rope_type}' is not supported (only default RoPE)")
        if d.get("use_sliding_window"):
            raise MtrError(f"{source}: sliding-window attention is not supported")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in d]
        if missing:
            raise MtrError(f"{source}: missing fields {missing}")
        return cls(**kw)

    def to_hf_dict(self, torch_dtype: str | None = None) -> dict:
        d = {k: getattr(self, k) for k in self.HF_FIELDS if getattr(self, k) is not None}
        d.pop("rope_theta")
        d.update(
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            hidden_act="silu",
            attention_dropout=0.0,
            initializer_range=0.02,
            use_cache=True,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=self.num_hidden_layers,
            rope_theta=self.rope_theta,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            dtype=torch_dtype or self.param_dtype,
        )
        return d

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> "Qwen2Config":
        p = pathlib.Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            raise MtrError(f"no config.json at {p}")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise MtrError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_hf_dict(d, str(p))


# --------------------------------------------------------------------------------------------
# Parameters: names, shapes and logical axes (the sharding rules map logical -> mesh axes).


def param_specs(cfg: Qwen2Config) -> dict:
    """{name: (shape, logical_axes)} for every parameter, in the nested layout of `params`."""
    E, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    Q = cfg.num_attention_heads * cfg.head_dim
    K = cfg.num_key_value_heads * cfg.head_dim
    layers = {
        "input_norm": ((L, E), ("layers", "norm")),
        "q_w": ((L, E, Q), ("layers", "embed", "q_heads")),
        "q_b": ((L, Q), ("layers", "q_heads")),
        "k_w": ((L, E, K), ("layers", "embed", "kv_heads")),
        "k_b": ((L, K), ("layers", "kv_heads")),
        "v_w": ((L, E, K), ("layers", "embed", "kv_heads")),
        "v_b": ((L, K), ("layers", "kv_heads")),
        "o_w": ((L, Q, E), ("layers", "q_heads", "embed")),
        "post_norm": ((L, E), ("layers", "norm")),
        "gate_w": ((L, E, I), ("layers", "embed", "mlp")),
        "up_w": ((L, E, I), ("layers", "embed", "mlp")),
        "down_w": ((L, I, E), ("layers", "mlp", "embed")),
    }
    specs = {"embed": ((V, E), ("vocab", "embed")), "layers": layers, "final_norm": ((E,), ("norm",))}
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ((E, V), ("embed", "vocab"))
    return specs


def init_params(cfg: Qwen2Config, key: jax.Array, std: float = 0.02) -> dict:
    """Random init (normal(0, std) weights, zero biases, unit norms), in `param_dtype`."""
    specs = param_specs(cfg)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple))
    leaves, treedef = flat
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, (shape, _)), k in zip(leaves, keys):
        name = path[-1].key
        if name.endswith("norm"):
            v = jnp.ones(shape, jnp.float32)
        elif name.endswith("_b"):
            v = jnp.zeros(shape, jnp.float32)
        else:
            v = std * jax.random.normal(k, shape, jnp.float32)
        out.append(v.astype(cfg.storage_dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def logical_axes(cfg: Qwen2Config) -> dict:
    """Same tree as params, each leaf a tuple of logical axis names."""
    return jax.tree_util.tree_map(
        lambda s: s[1], param_specs(cfg), is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)
    )


# --------------------------------------------------------------------------------------------
# The maths.


@functools.cache
def _cpu_lacks_bf16_dot() -> bool:
    """True on an x86 CPU without AVX512-BF16 / AMX-BF16. There XLA:CPU's bfloat16 matmul runs at about
    0.7x its float32 one (2-core AVX2 EPYC, 4096x896x4864: 40 vs 57 GFLOP/s), so a large low-precision
    matmul is faster done in float32 on exact upcasts of its bf16 operands (same products, float32
    accumulation either way). MTR_CPU_BF16_DOT=native|upcast overrides the probe."""
    forced = os.environ.get("MTR_CPU_BF16_DOT", "auto")
    if forced in ("native", "upcast"):
        return forced == "upcast"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" not in flags and "amx_bf16" not in flags


# below this many rows on either side the upcast costs more than it saves. A whole 0.5B decode step's
# matmuls (2-core AVX2): 0.47x at 8 rows, 0.79x at 48, 1.08x at 64, 1.13-1.19x at 96-128
UPCAST_MIN_ROWS = 64


def _upcast_pays(spec: str, a, b) -> bool:
    """Whether this low-precision einsum should run as a float32 one (see `_cpu_lacks_bf16_dot`): only on
    the CPU backend, and only when both operands have at least UPCAST_MIN_ROWS free (non-contracted,
    non-batch) rows; measured on AVX2: 0.76x at 16 rows (one 896x4864 matmul), 1.08x at 64 (a decode
    step's matmuls), 1.18x at 128, 1.3-1.4x at 256 and up."""
    if a.dtype == jnp.float32 or jax.default_backend() != "cpu" or not _cpu_lacks_bf16_dot():
        return False
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    free_a = math.prod(n for c, n in zip(sa, a.shape) if c not in sb)
    free_b = math.prod(n for c, n in zip(sb, b.shape) if c not in sa)
    return min(free_a, free_b) >= UPCAST_MIN_ROWS


def _physical_transpose(x, perm):
    """x.transpose(perm) as a real copy in memory. XLA turns a plain transpose feeding a dot into a
    layout change of the operand (no copy); through a 1-D array it has to move the data."""
    y = jnp.transpose(x, perm)
    return jax.lax.optimization_barrier(y.reshape(-1)).reshape(y.shape)


def _lhs_contracting_last(spec, a, b):
    """On XLA:CPU a low-precision dot whose first operand does not hold its batch dims first and its
    contracting dims last (a weight gradient x^T @ g contracts the token dims, which lead) runs at
    about a third of the speed (AMX Xeon, bf16, 4096x896 by 4096x18992: 229 vs 786 GFLOP/s), and
    XLA folds a plain transpose back into the dot. So the operands are copied into that order first;
    the copy costs a pass over an activation-sized operand. Only where the result then comes out in
    the asked order: a dot whose result XLA has to lay out transposed falls back to a kernel without
    bf16 x bf16 -> f32 (an UNIMPLEMENTED error at run time), so those specs are left as they are."""
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    batch = [c for c in out if c in sa and c in sb]
    contract = [c for c in sa if c in sb and c not in out]
    free_a = [c for c in out if c in sa and c not in sb]
    free_b = [c for c in out if c in sb and c not in sa]
    if out != "".join(batch + free_a + free_b):
        return spec, a, b
    want_a = "".join(batch + free_a + contract)
    want_b = "".join(batch + [c for c in sb if c not in batch])
    if want_a != sa:
        a = _physical_transpose(a, [sa.index(c) for c in want_a])
    if want_b != sb:
        b = _physical_transpose(b, [sb.index(c) for c in want_b])
    return f"{want_a},{want_b}->{out}", a, b


def _lp_dot(spec, a, b):
    """einsum with float32 accumulation and result; on a CPU without bf16 matmuls a large one runs in
    float32; on other CPUs its operands are first laid out as XLA:CPU's fast bf16 kernel wants them."""
    if _upcast_pays(spec, a, b):
        return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32), preferred_element_type=jnp.float32)
    if a.dtype != jnp.float32 and jax.default_backend() == "cpu":
        spec, a, b = _lhs_contracting_last(spec, a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lp_einsum(spec, a, b):
    return _lp_dot(spec, a, b)


def _lp_einsum_fwd(spec, a, b):
    return _lp_einsum(spec, a, b), (a, b)


def _lp_einsum_bwd(spec, res, g):
    # Without this rule the f32 cotangent meets a bf16 operand and the backward matmuls (2/3 of
    # training FLOPs) run in f32. Here they run in the operands' dtype with f32 accumulation.
    a, b = res
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    g = g.astype(a.dtype)
    da = _lp_dot(f"{out},{sb}->{sa}", g, b)
    db = _lp_dot(f"{sa},{out}->{sb}", a, g)
    return da.astype(a.dtype), db.astype(b.dtype)


_lp_einsum.defvjp(_lp_einsum_fwd, _lp_einsum_bwd)


def mp_einsum(spec: str, a, b, dt):
    """einsum of a, b cast to `dt`, accumulated and returned in float32. For low-precision `dt`
    the gradients are low-precision matmuls too. `spec` must be explicit (no '...') and every
    index of one operand must appear in the other operand or the output."""
    a, b = a.astype(dt), b.astype(dt)
    if jnp.dtype(dt) == jnp.float32:
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return _lp_einsum(spec, a, b)


def _mm(x, w, cfg: Qwen2Config):
    """x @ w in the compute dtype with float32 accumulation."""
    lead = "abcd"[: x.ndim - 1]
    return mp_einsum(f"{lead}e,ef->{lead}f", x, w, cfg.compute_dtype)


DROPOUT_KEY = "lora@dropout_key"  # per-layer uint32 key data [L, 2] a training step adds to params["layers"]
_PROJ_INDEX = {k: i for i, k in enumerate(("q_w", "k_w", "v_w", "o_w", "gate_w", "up_w", "down_w"))}


def _proj(x, lw, key: str, cfg: Qwen2Config):
    """x @ lw[key] (float32 out), for a plain weight or an int8 QLoRA base ({"int8", "scale"}: one
    scale per output column, so the scale is applied after the int8 matmul), plus the LoRA update
    (x @ a) @ b * alpha / r when the layer holds adapters for `key` (model/lora.py)."""
    w = lw[key]
    if isinstance(w, dict):
        out = int8_matmul(x, w, cfg.quant_activations, cfg.compute_dtype)
    else:
        out = _mm(x, w, cfg)
    a = lw.get(key + "@lora_a")
    if a is not None:
        seed = lw.get(DROPOUT_KEY)  # training only: peft's lora_dropout, on the adapter path
        if seed is not None and cfg.lora_dropout > 0.0:
            k = jax.random.fold_in(jax.random.wrap_key_data(seed), _PROJ_INDEX[key])
            keep = jax.random.bernoulli(k, 1.0 - cfg.lora_dropout, x.shape)
            x = jnp.where(keep, x.astype(jnp.float32) / (1.0 - cfg.lora_dropout), 0.0).astype(x.dtype)
        xa = _mm(x, a, cfg).astype(cfg.compute_dtype)
        out = out + _mm(xa, lw[key + "@lora_b"], cfg) * (cfg.lora_alpha / a.shape[-1])
    return out


def rms_norm(x, w, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w.astype(jnp.float32) * x32


def rope(x, positions, theta):
    """Hugging Face rotate-half RoPE. x: [B, T, H, D]; positions: [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2 :]
    rot = jnp.concatenate([-x2, x1], axis=-1)
    return x32 * cos + rot * sin


def attention(q, k, v, mask, cfg: Qwen2Config, heads_first: bool = False):
    """Grouped-query attention. q: [B,T,H,D]; k, v: [B,S,Hkv,D], or [B,Hkv,S,D] with heads_first
    (the sampler's cache layout: the batched matmuls read it without a transpose per layer);
    mask: [B,T,S] bool."""
    B, T, H, D = q.shape
    Hkv = k.shape[1 if heads_first else 2]
    rep = H // Hkv
    dt = cfg.compute_dtype
    q = q.reshape(B, T, Hkv, rep, D).astype(dt)
    if heads_first:
        # everything in bgr-first order: XLA:CPU has no bf16 kernel for a contraction with the
        # btgrd layout against a heads-first cache when t > 1 (forward: probs @ v; backward: dq)
        q = q.transpose(0, 2, 3, 1, 4)  # [B, Hkv, rep, T, D]
        scores = mp_einsum("bgrtd,bgsd->bgrts", q, k, dt)
    else:
        scores = mp_einsum("btgrd,bsgd->bgrts", q, k, dt)
    scores = scores * (D ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if heads_first:
        out = mp_einsum("bgrts,bgsd->bgrtd", probs, v, dt).transpose(0, 3, 1, 2, 4)
    else:
        out = mp_einsum("bgrts,bsgd->btgrd", probs, v, dt)
    return out.reshape(B, T, H * D)


def causal_attention(q, k, v, mask, cfg: Qwen2Config):
    """Full-sequence causal attention computed block by block: query block i only meets keys
    0..end of block i, skipping the all-masked upper triangle (at T=768, 21/36 of the score work;
    T^2 softmax traffic dominates training on CPU). Same numbers as `attention`: the skipped
    entries have probability exactly 0."""
    T = q.shape[1]
    block = cfg.attention_block
    if block <= 0 or T <= block or T % block:
        return attention(q, k, v, mask, cfg)
    outs = []
    for i in range(T // block):
        s, e = i * block, (i + 1) * block
        outs.append(attention(q[:, s:e], k[:, :e], v[:, :e], mask[:, s:e, :e], cfg))
    return jnp.concatenate(outs, axis=1)


def _layer(cfg: Qwen2Config, h, lw, positions, mask, kv_write, causal: bool = False, heads_first: bool = False):
    """One decoder layer. kv_write(k, v) -> (k_all, v_all) lets the caller splice in a cache
    (heads_first: k_all, v_all are [B, Hkv, S, D]). causal=True: keys are this same sequence (no
    cache), so the upper triangle can be skipped."""
    B, T, _ = h.shape
    dt = cfg.compute_dtype
    x = rms_norm(h, lw["input_norm"], cfg.rms_norm_eps).astype(dt)
    q = (_proj(x, lw, "q_w", cfg) + lw["q_b"].astype(jnp.float32)).reshape(B, T, cfg.num_attention_heads, cfg.head_dim)
    k = (_proj(x, lw, "k_w", cfg) + lw["k_b"].astype(jnp.float32)).reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
    v = (_proj(x, lw, "v_w", cfg) + lw["v_b"].astype(jnp.float32)).reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
    q = rope(q, positions, cfg.rope_theta)
    k = rope(k, positions, cfg.rope_theta)
    k_all, v_all, extra = kv_write(k, v)
    if causal:
        a = causal_attention(q, k_all, v_all, mask, cfg)
    else:
        a = attention(q, k_all, v_all, mask, cfg, heads_first=heads_first)
    h = h + _proj(a.astype(dt), lw, "o_w", cfg).astype(h.dtype)
    x = rms_norm(h, lw["post_norm"], cfg.rms_norm_eps).astype(dt)
    g = _proj(x, lw, "gate_w", cfg)
    u = _proj(x, lw, "up_w", cfg)
    m = (jax.nn.silu(g) * u).astype(dt)
    h = h + _proj(m, lw, "down_w", cfg).astype(h.dtype)
    return h, extra


def _run_layers(cfg: Qwen2Config, params, h, positions, mask, cache_layers=None, write_fn=None):
    """Runs every layer (scan or loop). With a cache, returns the updated per-layer (k, v)."""
    layers = params["layers"]

    def body(h, xs):
        lw, ck, cv = xs
        if ck is None:
            kv_write = lambda k, v: (k, v, None)
        else:
            kv_write = lambda k, v: write_fn(ck, cv, k, v)
        return _layer(cfg, h, lw, positions, mask, kv_write, causal=ck is None, heads_first=ck is not None)

    if cfg.remat:
        body = jax.checkpoint(body, prevent_cse=not cfg.scan_layers, policy=REMAT_POLICIES[cfg.remat_policy])
    ck_all = cache_layers[0] if cache_layers is not None else None
    cv_all = cache_layers[1] if cache_layers is not None else None
    if cfg.scan_layers:
        h, extra = jax.lax.scan(body, h, (layers, ck_all, cv_all))
        return h, extra
    extras = []
    for i in range(cfg.num_hidden_layers):
        lw = jax.tree_util.tree_map(lambda a: a[i], layers)
        ck = ck_all[i] if ck_all is not None else None
        cv = cv_all[i] if cv_all is not None else None
        h, e = body(h, (lw, ck, cv))
        extras.append(e)
    if cache_layers is None or extras[0] is None:
        return h, None
    return h, (jnp.stack([e[0] for e in extras]), jnp.stack([e[1] for e in extras]))


# Trainable token rows in patch form (`lora.with_adapters(..., patch_rows=True)`, the training
# losses): the frozen embed / lm_head stay as they are and these keys carry the rows [K, E] and
# their token ids [K]. Reads of those rows come from the patch, so the gradient reaches the K rows
# without a dense [V, E] gradient of the embedding (2.3 GiB of the GRPO step's temp at 0.5B).
PATCH_IDS = "token_ids@rows"


def head_patch(params, cfg: Qwen2Config):
    """(rows [K, E], ids [K]) replacing the head's columns ids, or None."""
    key = "embed@rows" if cfg.tie_word_embeddings else "lm_head@rows"
    return (params[key], params[PATCH_IDS]) if key in params else None


def embed_tokens(params, tokens):
    """Input embeddings in float32: rows of `embed`, the patched token ids from their rows."""
    h = jnp.take(params["embed"], tokens, axis=0).astype(jnp.float32)
    if "embed@rows" not in params:
        return h
    hit = tokens[..., None] == params[PATCH_IDS]  # [..., K]: at most one per token
    rows = jnp.einsum("...k,ke->...e", hit.astype(jnp.float32), params["embed@rows"].astype(jnp.float32))
    return jnp.where(jnp.any(hit, axis=-1)[..., None], rows, h)


def _head(cfg: Qwen2Config, params, h):
    x = rms_norm(h, params["final_norm"], cfg.rms_norm_eps).astype(cfg.compute_dtype)
    if isinstance(params.get("lm_head"), dict):  # an int8 sampling copy (model/quant.py)
        return int8_matmul(x, params["lm_head"], cfg.quant_activations, cfg.compute_dtype)
    if cfg.tie_word_embeddings:
        logits = mp_einsum("bte,ve->btv", x, params["embed"], cfg.compute_dtype)
    else:
        logits = _mm(x, params["lm_head"], cfg)
    patch = head_patch(params, cfg)
    if patch is not None:
        logits = logits.at[..., patch[1]].set(mp_einsum("bte,ke->btk", x, patch[0], cfg.compute_dtype).astype(logits.dtype))
    return logits


def hidden_states(params, cfg: Qwen2Config, tokens, positions=None, segment_ids=None):
    """Final hidden states (before the final norm) for a full sequence, no cache."""
    B, T = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    causal = jnp.tril(jnp.ones((T, T), bool))
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
    mask = causal[None] & same
    # a padding query row would be all-masked; let it see itself so softmax stays finite
    mask = mask | jnp.eye(T, dtype=bool)[None]
    h = embed_tokens(params, tokens)
    h, _ = _run_layers(cfg, params, h, positions, mask)
    return h


def forward(params, cfg: Qwen2Config, tokens, positions=None, segment_ids=None):
    """Logits [B, T, V] in float32. segment_ids: 0 = padding; tokens attend within their segment."""
    h = hidden_states(params, cfg, tokens, positions, segment_ids)
    return _head(cfg, params, h)


# --------------------------------------------------------------------------------------------
# KV cache.


def init_cache(cfg: Qwen2Config, batch: int, max_len: int, dtype=None) -> dict:
    """k, v: [L, B, Hkv, S, D] (heads first, as the sampler's cache: attention reads a layer's
    slice without a transpose); end: [B] filled slots per row. dtype defaults to the compute dtype."""
    dtype = dtype or cfg.compute_dtype
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "end": jnp.zeros((batch,), jnp.int32)}


def scatter_bits(cache, index, x):
    """cache.at[index].set(x) (out-of-range slots dropped) on the cache's raw bits. XLA:CPU has no
    bfloat16 scatter: on a bf16 cache it converts the WHOLE [L, B, Hkv, S, D] cache to float32 and
    back at every layer of every step (at Qwen2.5-0.5B, batch 8: 197 -> 104 ms per decode step).
    A 16-bit float is scattered as uint16 instead: same bits, no conversion. Not differentiable
    (a bitcast carries no gradient): for the sampler's cache only."""
    x = x.astype(cache.dtype)
    if jnp.dtype(cache.dtype).itemsize != 2:
        return cache.at[index].set(x, mode="drop")
    u = jax.lax.bitcast_convert_type(cache, jnp.uint16)
    u = u.at[index].set(jax.lax.bitcast_convert_type(x, jnp.uint16), mode="drop")
    return jax.lax.bitcast_convert_type(u, cache.dtype)


def extend(params, cfg: Qwen2Config, cache: dict, tokens, lengths):
    """Append `tokens` [B, C] (row b uses its first lengths[b]) to the cache; return logits [B, C, V]
    for every chunk position and the new cache. Positions continue from each row's `end`."""
    h, new_cache = extend_hidden(params, cfg, cache, tokens, lengths)
    return _head(cfg, params, h), new_cache


def extend_hidden(params, cfg: Qwen2Config, cache: dict, tokens, lengths):
    """`extend` without the LM head: final hidden states [B, C, E] (before the final norm)."""
    B, C = tokens.shape
    S = cache["k"].shape[3]
    end = cache["end"]
    positions = end[:, None] + jnp.arange(C, dtype=jnp.int32)[None, :]  # [B, C]
    slots = jnp.arange(S, dtype=jnp.int32)
    # query at position p sees key slots <= p (slots < end are history, the rest of the chunk is causal)
    mask = slots[None, None, :] <= positions[:, :, None]

    j = jnp.arange(C, dtype=jnp.int32)
    slots = jnp.where(j[None, :] < lengths[:, None], positions, S)  # padding of the chunk: dropped
    rows = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, C))

    def write(ck, cv, k, v):
        # ck [B, Hkv, S, D]; k [B, C, Hkv, D] lands at [b, :, slot, :]. A plain scatter, not
        # `scatter_bits`: this path is differentiated (GRPO's shared prompt), and a bitcast is not
        ck = ck.at[rows, :, slots].set(k.astype(ck.dtype), mode="drop")
        cv = cv.at[rows, :, slots].set(v.astype(cv.dtype), mode="drop")
        return ck, cv, (ck, cv)

    h = embed_tokens(params, tokens)
    h, (nk, nv) = _run_layers(cfg, params, h, positions, mask, (cache["k"], cache["v"]), write)
    return h, {"k": nk, "v": nv, "end": end + lengths.astype(jnp.int32)}


def shared_prefix_hidden(params, cfg: Qwen2Config, prompts, prompt_lens, completions):
    """Hidden states of G completions per prompt with each prompt run ONCE (GRPO's groups share
    their prompt, which is most of each row's tokens). prompts [Bq, P] (row q uses its first
    prompt_lens[q]), completions [Bq*G, C] (rows q*G..q*G+G-1 continue prompt q, at positions
    prompt_lens[q] + j). Returns (h at each prompt's last token [Bq, E], h of every completion
    token [Bq*G, C, E]): the same numbers as `hidden_states` on the concatenated rows.
    Differentiable: the prompt's keys and values carry gradient from all G completions."""
    Bq, P = prompts.shape
    R, C = completions.shape
    G = R // Bq
    cache = init_cache(cfg, Bq, P)
    h_p, cache = extend_hidden(params, cfg, cache, prompts, prompt_lens)
    h_last = jnp.take_along_axis(h_p, (prompt_lens - 1)[:, None, None], axis=1)[:, 0]
    lens = jnp.repeat(prompt_lens, G)  # [R]
    positions = lens[:, None] + jnp.arange(C, dtype=jnp.int32)[None, :]
    # a completion token sees its prompt's real tokens and the completion up to itself
    prompt_keys = jnp.arange(P)[None, None, :] < lens[:, None, None]
    own_keys = jnp.tril(jnp.ones((C, C), bool))[None]
    mask = jnp.concatenate([jnp.broadcast_to(prompt_keys, (R, C, P)), jnp.broadcast_to(own_keys, (R, C, C))], axis=2)

    def write(ck, cv, k, v):  # ck: this layer's prompt keys [Bq, Hkv, P, D]; k: [R, C, Hkv, D]
        k_all = jnp.concatenate([jnp.repeat(ck, G, axis=0), k.transpose(0, 2, 1, 3).astype(ck.dtype)], axis=2)
        v_all = jnp.concatenate([jnp.repeat(cv, G, axis=0), v.transpose(0, 2, 1, 3).astype(cv.dtype)], axis=2)
        return k_all, v_all, None

    h = embed_tokens(params, completions)
    h_c, _ = _run_layers(cfg, params, h, positions, mask, (cache["k"], cache["v"]), write)
    return h_last, h_c


# --------------------------------------------------------------------------------------------
# The NNX module: holds the parameters as nnx.Param (with logical-axis metadata).


class Qwen2(nnx.Module):
    """Qwen2ForCausalLM. `model(input_ids, positions=None, attention_mask=None)` -> logits."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs | None = None, params: dict | None = None):
        self.config = config
        if params is None:
            rngs = rngs or nnx.Rngs(0)
            params = init_params(config, rngs.params())
        self.set_params(params)

    def set_params(self, params: dict) -> None:
        axes = logical_axes(self.config)
        self.embed = nnx.Param(params["embed"], logical_axes=axes["embed"])
        self.final_norm = nnx.Param(params["final_norm"], logical_axes=axes["final_norm"])
        self.layers = nnx.Dict(
            {k: nnx.Param(v, logical_axes=axes["layers"][k]) for k, v in params["layers"].items()}
        )
        if "lm_head" in params:
            self.lm_head = nnx.Param(params["lm_head"], logical_axes=axes["lm_head"])

    def params(self) -> dict:
        """Plain nested dict of arrays (the layout `forward` takes)."""
        out = {
            "embed": self.embed[...],
            "final_norm": self.final_norm[...],
            "layers": {k: v[...] for k, v in self.layers.items()},
        }
        if hasattr(self, "lm_head"):
            out["lm_head"] = self.lm_head[...]
        return out

    def __call__(self, input_ids, positions=None, attention_mask=None, segment_ids=None):
        if segment_ids is None and attention_mask is not None:
            segment_ids = jnp.asarray(attention_mask).astype(jnp.int32)
        return forward(self.params(), self.config, jnp.asarray(input_ids), positions, segment_ids)
