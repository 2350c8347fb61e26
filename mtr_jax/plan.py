"""`mtr plan --config C`: per-device memory of an SFT / GRPO run, FITS or DOES NOT FIT, before launch.

What is counted (bytes per device, under the config's mesh and the sharding rules of
`parallel/rules.py`, i.e. exactly how the trainers place arrays):

- parameters: every weight in `model.param_dtype`, sharded over fsdp x tensor where it divides.
- optimizer state: AdamW as built by `train/optim.py` -- first moment in float32 (bfloat16 with
  `optim.mu_dtype`), second moment in the param dtype (optax keeps `nu` like the params); the params themselves are the master weights.
- gradients: one micro-batch's gradients (param dtype), alive with the activations during the
  backward pass, plus the float32 accumulator of `train/step.py` when `grad_accum` > 1 (one
  micro-batch -- every GRPO minibatch -- has none).
- optimizer update: after the backward pass, beside the summed gradients. On one device
  `train.optim.AdamW.apply` writes params and moments in place a chunk at a time (its only
  leaf-sized temporary: a copy of the largest bfloat16 first moment); on a mesh the leaves are
  not chunked and XLA builds optax's float32 update tree (4 bytes a parameter). A train step peaks
  at max(backward, update) beyond the persistent state.
- reference model: a second copy of the parameters when `grpo.beta > 0`.
- sampler KV cache: k and v [layers, B x G rows, grpo.max_len, kv heads, head dim] in the compute
  dtype, rows sharded over data x fsdp, plus the prompts' prefill cache.
- activations: per micro-batch rows on this device. A full-row micro-batch is `rows` rows of T; GRPO's
  shared-prompt update (`grpo.share_prompt`, `grpo_shapes`) is each group's prompt once [groups, P]
  plus the completions [rows, C] against P + C keys, with the LM head at completion positions only.
  The model materialises the attention scores [rows, heads, Tq, Tk] in float32, so per segment
  att = rows*heads*Tq*Tk*4, lin = rows*Tq*(hidden+intermediate)*4, h = rows*Tq*hidden*4, and
      no remat:  L x sum(2.96 x att + 7.16 x lin) + head
      remat:     L x sum(h) + max(max over segments(2.57 x att + 8.5 x lin), head') (+ logits, dense head)
  The dense head (vocabulary <= 32768) holds logits = positions*V*4: head = 2.95 x logits, head' =
  1.67 x logits. The vocabulary-chunked head (`train.losses.head_logp_entropy`, e.g. 151936 -> 8
  chunks of 18992) never holds [positions, V]: head = head' = 2.5 x one chunk's logits (its
  backward recomputes each chunk, remat or not). The coefficients were fitted to XLA's compiled memory
  analysis of the real train step on small configs (2 layers, hidden 64; the chunked head's with
  the real vocabulary); tests/test_plan.py re-checks them within 25%, and
  `python -m mtr_jax.bench.plan_check` checks them at the real Qwen2.5-0.5B shape, which they were
  not fitted to.
- GRPO also runs a no-grad log-prob forward over one minibatch (old/ref log-probs): the hidden
  states + max(one layer's 1.8 x att + 1.7 x lin, the head's transients): 2.7 x logits + logits
  (dense) or 2 x one chunk (chunked).

The peak is persistent state (params, optimizer, reference) + the largest phase (update,
log-prob forward, sampling). FITS means peak <= 90% of the device memory (XLA needs headroom for
fragmentation and collectives). Bad accelerator or mesh, and DOES NOT FIT, exit with code 2.
"""

from __future__ import annotations

import json
import math
import os
import re
import types

from mtr_jax.errors import MtrError

GiB = 1024**3
USABLE = 0.90  # share of device memory a run may plan to use

# Memory per JAX device (one chip; v4/v5p chips are megacore: one device per chip).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "h100": 80, "h200": 141}
# Devices of one host when no slice size is given (v4-8 / v5p-8 = 4 chips, v5e-8 / v6e-8 = 8 chips).
HOST_DEVICES = {"v4": 4, "v5e": 8, "v5p": 4, "v6e": 8, "h100": 1, "h200": 1}
# Cloud TPU names count TensorCores for v4/v5p (2 per chip) and chips for v5e/v6e.
CORES_PER_DEVICE = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "tpu-v4": "v4", "tpu-v5e": "v5e", "tpu-v5p": "v5p", "tpu-v6e": "v6e",
            "v6e": "v6e", "trillium": "v6e", "gpu": "h100"}

# Activation model coefficients (fitted on XLA CPU memory analysis of `train/step.py`; see module doc).
NO_REMAT = (2.96, 7.16, 2.95)
REMAT = (2.57, 8.5, 1.67)
FORWARD = (1.8, 1.7, 2.7)  # no-grad log-prob forward (GRPO old/ref log-probs)
# The vocabulary-chunked head (train.losses.head_logp_entropy, vocabularies > 32768) holds this many
# [positions, chunk] float32 buffers at once: in a backward pass (its hand-written backward recomputes
# each chunk's logits, so nothing of it is saved, remat or not; 2.0 and 2.5 both fit the tests, 2.5 is
# the safer side) and in a no-grad forward. Measured on 2-layer, hidden-64 configs with the real
# 151936 vocabulary (re-checked in tests/test_plan.py), not on the real model.
CHUNKED_HEAD = (2.5, 2.0)

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ------------------------------------------------------------------------------------------------
# Inputs: accelerator, model shape.


def parse_accelerator(name: str) -> tuple[str, int, float]:
    """'v5e-8' / 'v5litepod-16' / 'v4-32' / 'h100x8' / 'cpu' -> (kind, n_devices, bytes per device)."""
    raw = str(name).strip().lower()
    if raw.startswith("cpu"):
        import jax

        n = jax.device_count()
        m = re.fullmatch(r"cpu(?:[-x](\d+))?", raw)
        if not m:
            raise MtrError(f"run.accelerator={name!r}: expected cpu or cpu-N")
        n = int(m.group(1)) if m.group(1) else n
        return "cpu", n, _host_ram() / n
    m = re.fullmatch(r"([a-z0-9-]+?)(?:[-x](\d+))?", raw)
    kind = m.group(1) if m else raw
    kind = _ALIASES.get(kind, kind)
    if not m or kind not in HBM_GIB:
        known = ", ".join(list(HBM_GIB) + ["cpu"])
        raise MtrError(
            f"run.accelerator={name!r}: unknown accelerator type (known: {known}; "
            "a slice size may follow, e.g. v5e-8, v4-32, h100x8)"
        )
    if m.group(2):
        n = int(m.group(2))
        per = CORES_PER_DEVICE.get(kind, 1)
        if kind in CORES_PER_DEVICE and n % per:
            raise MtrError(f"run.accelerator={name!r}: {kind} slice sizes count TensorCores and must be even")
        n //= per
    else:
        n = HOST_DEVICES[kind]
    if n < 1:
        raise MtrError(f"run.accelerator={name!r}: needs at least one device")
    return kind, n, HBM_GIB[kind] * GiB


def _host_ram() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def model_config(cfg):
    """Qwen2Config of a run config (model/presets.py). An `init_from` that is not a local path
    (e.g. a hub id not downloaded yet) is ignored: planning needs only the preset's shapes."""
    import dataclasses

    from mtr_jax.model.presets import resolve_model_config

    from mtr_jax.model.sources import is_spec_available

    m = cfg.model
    if m.init_from and not is_spec_available(m.init_from):
        m = dataclasses.replace(m, init_from="")
    return resolve_model_config(m)


# ------------------------------------------------------------------------------------------------
# The estimate.


def _fake_mesh(data: int, fsdp: int, tensor: int):
    # rules.spec_for only reads `mesh.shape`: plan without owning the devices.
    return types.SimpleNamespace(shape={"data": data, "fsdp": fsdp, "tensor": tensor})


def param_elems_per_device(mcfg, mesh_sizes) -> tuple[int, int]:
    """(total parameter count, parameter elements held by one device) under the sharding rules."""
    from mtr_jax.model.qwen2 import param_specs
    from mtr_jax.parallel.rules import spec_for

    mesh = _fake_mesh(*mesh_sizes)
    total = per = 0
    leaves = _spec_leaves(param_specs(mcfg))
    for shape, names in leaves:
        n = math.prod(shape)
        spec = spec_for(names, shape, mesh, mcfg)
        div = 1
        for ax in spec:
            for a in (ax,) if isinstance(ax, str) else (ax or ()):
                div *= mesh.shape[a]
        total += n
        per += n // div
    return total, per


def _per_device(leaves, mesh, mcfg) -> int:
    from mtr_jax.parallel.rules import spec_for

    per = 0
    for shape, names in leaves:
        spec = spec_for(names, shape, mesh, mcfg)
        div = 1
        for ax in spec:
            for a in (ax,) if isinstance(ax, str) else (ax or ()):
                div *= mesh.shape[a]
        per += math.prod(shape) // div
    return per


def lora_elems_per_device(mcfg, mesh_sizes, lc) -> int:
    """Adapter elements one device holds (they shard like their projection, rank replicated)."""
    from mtr_jax.model.lora import adapter_specs, target_keys

    return _per_device(_spec_leaves(adapter_specs(mcfg, target_keys(lc.targets), lc.rank)), _fake_mesh(*mesh_sizes), mcfg)


def proj_elems_per_device(mcfg, mesh_sizes) -> int:
    """Elements of the seven projection weights (what QLoRA stores as int8) on one device."""
    from mtr_jax.model.lora import QUANT_KEYS
    from mtr_jax.model.qwen2 import param_specs

    layers = param_specs(mcfg)["layers"]
    return _per_device([layers[k] for k in QUANT_KEYS], _fake_mesh(*mesh_sizes), mcfg)


def _spec_leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _spec_leaves(v)
    else:
        yield tree


def causal_fraction(T: int, blk: int = 0) -> float:
    """Share of the T x T scores the block-causal training attention materialises (qwen2.causal_attention)."""
    if blk <= 0 or T <= blk or T % blk:
        return 1.0
    n = T // blk
    return n * (n + 1) / 2 / (n * n)


def _segment_terms(mcfg, rows: int, Tq: int, Tk: int, tensor: int, causal: bool) -> tuple[float, float, float]:
    """(att, lin, h) bytes of one layer for `rows` rows of Tq queries against Tk keys (see module doc)."""
    E, I, H = mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_attention_heads
    th = tensor if H % tensor == 0 and mcfg.num_key_value_heads % tensor == 0 else 1
    ti = tensor if I % tensor == 0 else 1
    frac = causal_fraction(Tq, getattr(mcfg, "attention_block", 0)) if causal else 1.0
    return rows * (H / th) * Tq * Tk * 4 * frac, rows * Tq * (E + I / ti) * 4, rows * Tq * E * 4


def segments(mcfg, rows: int, T: int, shared: tuple | None = None) -> tuple[list, int]:
    """What one training micro-batch runs: ([(rows, Tq, Tk, causal)], positions that reach the LM
    head). Full rows: `rows` rows of T. GRPO's shared-prompt layout (`shared` = (groups, P, C)):
    each group's prompt once ([groups, P], causal) and the completions ([rows, C] against P + C
    keys); only completion positions reach the head."""
    if shared is None:
        return [(rows, T, T, True)], rows * T
    q, P, C = shared
    return [(q, P, P, True), (rows, C, P + C, False)], rows * C


def activation_bytes(mcfg, rows: int, T: int, tensor: int = 1, remat: bool | None = None, shared: tuple | None = None) -> float:
    """Train-step activations of one device holding `rows` rows of length T, or the shared-prompt
    layout `shared` = (groups, P, C) (see module doc). The two parts of the shared layout run as two
    layer scans, so their rematerialised transients do not coexist; their saved activations do."""
    segs, n_head = segments(mcfg, rows, T, shared)
    terms = [_segment_terms(mcfg, r, tq, tk, tensor, c) for r, tq, tk, c in segs]
    L, V = mcfg.num_hidden_layers, mcfg.vocab_size
    tv = tensor if V % tensor == 0 else 1
    chunked = head_columns(V / tv) < V / tv
    logits = n_head * head_columns(V / tv) * 4
    remat = mcfg.remat if remat is None else remat
    if remat:
        a, b, c = REMAT
        layer = max(a * att + b * lin for att, lin, _ in terms)
        saved = L * sum(h for _, _, h in terms)
        # remat_policy "dots" is planned as "full": XLA:CPU's compiled step with dots saveable measured
        # within 10% of this (tests/test_plan.py); a separate term overestimated it by 50%
        if chunked:
            return saved + max(layer, CHUNKED_HEAD[0] * logits)
        return saved + max(layer, c * logits) + logits
    a, b, c = NO_REMAT
    return L * sum(a * att + b * lin for att, lin, _ in terms) + (CHUNKED_HEAD[0] if chunked else c) * logits


def head_columns(v: float) -> float:
    """Logit columns the loss holds at once: the whole vocabulary up to one chunk, else one chunk of
    `train.losses.head_logp_entropy` (151936 -> 18992): it never materialises [rows, T, V]."""
    from mtr_jax.train.losses import VOCAB_CHUNK, vocab_chunk

    return v if v <= VOCAB_CHUNK else vocab_chunk(int(v))


def _forward_only_bytes(mcfg, rows: int, T: int, tensor: int, shared: tuple | None = None) -> float:
    """A no-grad forward to log-probs: nothing is saved for a backward, so the phases follow each
    other -- one layer's transients at a time, then the LM head's -- beside the hidden states."""
    a, b, c = FORWARD
    segs, n_head = segments(mcfg, rows, T, shared)
    terms = [_segment_terms(mcfg, r, tq, tk, tensor, causal) for r, tq, tk, causal in segs]
    V = mcfg.vocab_size
    tv = tensor if V % tensor == 0 else 1
    layer = max(a * att + b * lin for att, lin, _ in terms)
    h = sum(h for _, _, h in terms)
    cols = head_columns(V / tv)
    logits = n_head * cols * 4
    if cols < V / tv:  # the chunked head is its own scan after the layers: the two peaks follow each other
        return h + max(layer, CHUNKED_HEAD[1] * logits)
    return h + max(layer, c * logits) + logits  # the dense head's [N, V] logits stay beside, as in the remat step


def _bucket(n: int, multiple: int = 128) -> int:
    """The GRPO update's sequence length: episodes padded to a multiple of 128 (worst case max_len)."""
    return -(-n // multiple) * multiple


def grpo_shapes(g) -> tuple[int, int]:
    """(P, C) the plan assumes for GRPO's shared-prompt update: the prompt budget `max_len` leaves
    after `max_turns` x `max_new_tokens` (at least 64), padded as `episodes_to_shared_batch` pads
    (P to a multiple of 128, C to a power of two >= 64), and completions filling the rest."""
    P = _bucket(max(64, g.max_len - g.max_turns * g.max_new_tokens))
    C = max(64, 1 << (max(g.max_len - P, 1) - 1).bit_length())
    return P, C


def _rows_per_device(rows: int, batch_div: int, what: str) -> int:
    if rows % batch_div:
        raise MtrError(f"{what}: {rows} rows do not split over data x fsdp = {batch_div} devices")
    return rows // batch_div


def estimate(cfg, mcfg, mesh_sizes: tuple[int, int, int], stage: str) -> dict:
    """Bytes per device of each component and the peak, for stage 'sft' or 'grpo'."""
    data, fsdp, tensor = mesh_sizes
    pb = _DTYPE_BYTES[mcfg.param_dtype]
    cb = _DTYPE_BYTES[mcfg.dtype]
    n_total, n_dev = param_elems_per_device(mcfg, mesh_sizes)
    optim = getattr(getattr(cfg, stage, None), "optim", None)
    mu_b = 2 if getattr(optim, "mu_dtype", "float32") == "bfloat16" else 4  # AdamW's first moment
    lc = getattr(cfg, "lora", None)
    n_train = n_dev  # what the optimiser updates
    params_bytes = n_dev * pb
    if lc is not None and lc.enabled:
        # LoRA: a frozen base (base_dtype, or int8 + a float32 scale per output column) plus float32
        # adapters, which alone get gradients and AdamW moments; the KL reference is the base itself
        n_train = lora_elems_per_device(mcfg, mesh_sizes, lc)
        bb = _DTYPE_BYTES[lc.base_dtype]
        proj = proj_elems_per_device(mcfg, mesh_sizes)
        params_bytes = (n_dev - proj) * bb + (proj * 1 if lc.base_quant == "int8" else proj * bb) + n_train * 4
        pb = 4  # the adapters
    accum = cfg.sft.grad_accum if stage == "sft" else 1  # GRPO steps one minibatch at a time
    out = {
        "params": params_bytes,
        "optimizer": n_train * (mu_b + pb),
        # alive beside the activations: one micro-batch's gradients, plus the float32 accumulator
        # when several micro-batches are summed (train/step.py skips it for one)
        "gradients": n_train * (pb + (4 if accum > 1 else 0)),
        # train.optim.AdamW.apply on one device: in place, a chunk at a time; the one leaf-sized
        # temporary is the uint16 view of the largest bfloat16 first moment (the embedding's). On a
        # mesh the leaves are not chunked and XLA builds optax's float32 update tree
        "update": (n_train * 4 if data * fsdp * tensor > 1
                   else (mcfg.vocab_size * mcfg.hidden_size * 2 if mu_b == 2 and n_train == n_dev else 0)),
        "reference": 0.0,
        "kv_cache": 0.0,
        "activations": 0.0,
        "logprob_forward": 0.0,
        "sampler_prefill": 0.0,
    }
    summed = n_train * (4 if accum > 1 else pb)  # what the update reads: the accumulator, or the one micro-batch's
    update_phase = summed + out["update"]
    bdiv = data * fsdp
    if stage == "sft":
        s = cfg.sft
        if s.grad_accum < 1 or s.batch_size % s.grad_accum:
            raise MtrError(f"sft.batch_size={s.batch_size} is not a multiple of sft.grad_accum={s.grad_accum}")
        rows = _rows_per_device(s.batch_size // s.grad_accum, bdiv, "sft.batch_size / sft.grad_accum")
        out["activations"] = activation_bytes(mcfg, rows, s.seq_len, tensor)
        phases = [out["gradients"] + out["activations"], update_phase]
    elif stage == "grpo":
        g = cfg.grpo
        n_rows = g.batch_size * g.group_size
        if g.minibatches < 1 or n_rows % g.minibatches:
            raise MtrError(f"grpo.minibatches={g.minibatches} does not divide B*G={n_rows}")
        T = _bucket(g.max_len)
        per_mb = n_rows // g.minibatches
        rows = _rows_per_device(per_mb, bdiv, "grpo.batch_size x group_size / minibatches")
        shared = None
        if g.share_prompt and per_mb % g.group_size == 0:  # as GRPOTrainer._update chooses its layout
            P, C = grpo_shapes(g)
            groups = per_mb // g.group_size
            shared = (groups // bdiv if groups % bdiv == 0 else groups, P, C)  # prompts split like rows, if they divide
        out["activations"] = activation_bytes(mcfg, rows, T, tensor, shared=shared)
        all_rows = -(-n_rows // bdiv)
        # old-policy / reference log-probs run one minibatch at a time; on-policy updates (mu = 1,
        # one minibatch) skip the old-policy forward, so only beta > 0 needs it
        needs_forward = g.beta > 0 or not (g.mu == 1 and g.minibatches == 1)
        out["logprob_forward"] = _forward_only_bytes(mcfg, rows, T, tensor, shared) if needs_forward else 0.0
        if g.beta and not (lc is not None and lc.enabled):
            out["reference"] = out["params"]
        # KV cache: rows sharded over data x fsdp (sampler BATCH_AXES), kv heads replicated
        per_row = 2 * mcfg.num_hidden_layers * g.max_len * mcfg.num_key_value_heads * mcfg.head_dim * cb
        prompts = -(-g.batch_size // bdiv)
        out["kv_cache"] = (all_rows + prompts) * per_row
        prompt_len = grpo_shapes(g)[0]
        # prefill: prompt rows x prompt_len queries against a cache of max_len slots
        a, b, _ = FORWARD
        th = tensor if mcfg.num_attention_heads % tensor == 0 and mcfg.num_key_value_heads % tensor == 0 else 1
        out["sampler_prefill"] = prompts * (a * (mcfg.num_attention_heads / th) * prompt_len * g.max_len * 4
                                            + b * prompt_len * (mcfg.hidden_size + mcfg.intermediate_size) * 4)
        phases = [out["gradients"] + out["activations"], update_phase, out["logprob_forward"],
                  out["kv_cache"] + out["sampler_prefill"]]
    else:
        raise MtrError(f"plan: unknown stage {stage!r}")
    out["train_step"] = max(phases[:2])  # the train step's own peak beyond persistent state
    persistent = out["params"] + out["optimizer"] + out["reference"]
    out["peak"] = persistent + max(phases)
    out["n_params"] = n_total
    return out


def candidate_meshes(n: int, mcfg):
    """Every (data, fsdp, tensor) with product n; tensor only over whole kv heads (rules replicate otherwise)."""
    for tensor in _divisors(n):
        if mcfg.num_key_value_heads % tensor or mcfg.num_attention_heads % tensor:
            continue
        for fsdp in _divisors(n // tensor):
            yield (n // tensor // fsdp, fsdp, tensor)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggest_mesh(cfg, mcfg, n: int, budget: float, stages: list[str]):
    """The fitting mesh (preferring 15% slack) with the least communication (most data parallelism,
    then the least tensor parallelism); if none fits, the one with the smallest peak. Returns (mesh, peak) or (None, None)."""
    best = None
    for mesh in candidate_meshes(n, mcfg):
        try:
            peak = max(estimate(cfg, mcfg, mesh, s)["peak"] for s in stages)
        except MtrError:
            continue  # batch does not split over this mesh
        fits = peak <= budget
        roomy = peak <= 0.85 * budget  # leave slack for what the model does not count
        key = (not fits, not roomy, -mesh[0] if fits else peak, mesh[2])
        if best is None or key < best[0]:
            best = (key, mesh, peak)
    return (best[1], best[2]) if best else (None, None)


def make_plan(cfg, stages: list[str] | None = None) -> dict:
    from mtr_jax.parallel.mesh import AXES, mesh_shape

    stages = stages or ["sft", "grpo"]
    kind, n, per_dev = parse_accelerator(cfg.run.accelerator)
    mcfg = model_config(cfg)
    sizes = {a: getattr(cfg.mesh, a) for a in AXES}
    mesh = mesh_shape(sizes, n)  # MtrError when the mesh does not divide the devices
    budget = per_dev * USABLE
    res = {"accelerator": cfg.run.accelerator, "kind": kind, "devices": n, "device_bytes": per_dev, "budget_bytes": budget,
           "mesh": dict(zip(AXES, mesh)), "model": cfg.model.preset, "n_params": None, "stages": {}}
    for s in stages:
        est = estimate(cfg, mcfg, mesh, s)
        res["n_params"] = est.pop("n_params")
        est["fits"] = est["peak"] <= budget
        res["stages"][s] = est
    sug, peak = suggest_mesh(cfg, mcfg, n, budget, stages)
    res["suggested_mesh"] = dict(zip(AXES, sug)) if sug else None
    res["suggested_peak"] = peak
    res["fits"] = all(v["fits"] for v in res["stages"].values())
    return res


_ROWS = [
    ("params", "parameters"),
    ("optimizer", "optimizer state (AdamW)"),
    ("gradients", "gradients (during the backward)"),
    ("update", "optimizer update temporaries"),
    ("reference", "reference model (grpo.beta>0)"),
    ("kv_cache", "sampler KV cache"),
    ("sampler_prefill", "sampler prefill activations"),
    ("activations", "train-step activations"),
    ("logprob_forward", "log-prob forward (B x G rows)"),
    ("peak", "PEAK per device"),
]


def format_plan(res: dict) -> str:
    g = lambda b: f"{b / GiB:9.3f}"  # noqa: E731
    stages = list(res["stages"])
    lines = [
        f"model {res['model']}: {res['n_params'] / 1e6:.1f}M parameters",
        f"accelerator {res['accelerator']}: {res['devices']} device(s) x {res['device_bytes'] / GiB:.1f} GiB"
        f" (plan budget {USABLE:.0%} = {res['budget_bytes'] / GiB:.2f} GiB)",
        "mesh " + " ".join(f"{k}={v}" for k, v in res["mesh"].items()),
        f"{'GiB per device':34s}" + "".join(f"{s.upper():>10s}" for s in stages),
    ]
    for key, label in _ROWS:
        lines.append(f"{label:34s}" + "".join(f" {g(res['stages'][s][key])}" for s in stages))
    for s in stages:
        st = res["stages"][s]
        verdict = "FITS" if st["fits"] else "DOES NOT FIT"
        lines.append(f"{s.upper()}: {verdict} ({st['peak'] / res['budget_bytes']:.0%} of budget)")
    if res["suggested_mesh"]:
        sm = " ".join(f"{k}={v}" for k, v in res["suggested_mesh"].items())
        lines.append(f"suggested mesh: {sm} (peak {res['suggested_peak'] / GiB:.3f} GiB per device)")
    return "\n".join(lines)


def cli(args) -> int:
    stage = getattr(args, "stage", None) or "both"
    stages = ["sft", "grpo"] if stage == "both" else [stage]
    res = make_plan(args.cfg, stages)
    if getattr(args, "json", False):
        print(json.dumps(res))
    else:
        print(format_plan(res))
    if not res["fits"]:
        bad = [s for s, v in res["stages"].items() if not v["fits"]]
        st = res["stages"][bad[0]]
        labels = dict(_ROWS)
        top = max((k for k in st if k in labels and k != "peak"), key=lambda k: st[k])
        if res["suggested_mesh"] and res["suggested_peak"] <= res["budget_bytes"]:
            hint = "try " + " ".join(f"mesh.{k}={v}" for k, v in res["suggested_mesh"].items())
        else:
            hint = "no mesh of these devices fits: use more devices, model.remat=true, or smaller batches / lengths"
        raise MtrError(
            f"{'/'.join(bad)} does not fit on {res['accelerator']}: peak {st['peak'] / GiB:.2f} GiB > budget "
            f"{res['budget_bytes'] / GiB:.2f} GiB per device (largest: {labels[top]} {st[top] / GiB:.2f} GiB); {hint}"
        )
    return 0
