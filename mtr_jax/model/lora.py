"""LoRA (and QLoRA) adapters for the Qwen2 projections, in the model's own pure-function style.

An adapter pair for projection `q_w` lives next to it in the stacked layer weights as
`q_w@lora_a` [L, in, r] and `q_w@lora_b` [L, r, out]; `qwen2._proj` adds `(x @ a) @ b * alpha / r`
to the frozen projection. Because the adapters travel inside `params["layers"]`, every path that
runs layers (training forward, shared-prefix GRPO update, the sampler's prefill and decode, scan or
unrolled) applies them with no code of its own. `b` starts at zero, so a fresh adapter leaves the
model exactly as it was.

Why not qwix: qwix's LoRA intercepts the `dot_general`/`einsum` calls of Flax modules by module
path; our model is one pure function over a dict of stacked arrays (no per-projection module to
intercept), so the adapters are written here instead, in ~100 lines, and shard under the same
rules table (logical axes `lora_rank` plus the projection's own in/out axes).

Trainable tokens (peft's `trainable_token_indices`): the rows of `embed` (and of an untied
`lm_head`) for a few token ids train with the adapters, as `embed@rows` [k, E] / `lm_head@rows`
[k, E]. They matter when the trace grammar uses special tokens the base never learned: in
Qwen2.5-Coder-0.5B-Instruct the `<tool_call>` row of `lm_head` sits 0.0006 from the unused ids'
rows, and LoRA on the projections alone never made `<tool_call>` the argmax after 12 SFT steps
(teacher-forced, it predicted `<|im_start|>` at all four tool-call tags and was right everywhere
else). The rows start as copies of the base rows (a no-op at step 0); `with_adapters` writes them
into the embedding and head, so every path (training, sampler, export) sees one ordinary params tree.

QLoRA: `quantize_base` stores each frozen projection as int8 with one float32 scale per output
column (symmetric, absmax); `qwen2._mm` dequantizes it to the compute dtype inside the matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtr_jax.errors import MtrError
from mtr_jax.model.quant import quantize_weight

# user-facing target names (ours and peft's) -> our projection keys
TARGETS = {"q": "q_w", "k": "k_w", "v": "v_w", "o": "o_w", "gate": "gate_w", "up": "up_w", "down": "down_w"}
PEFT_NAMES = {"q_w": "self_attn.q_proj", "k_w": "self_attn.k_proj", "v_w": "self_attn.v_proj",
              "o_w": "self_attn.o_proj", "gate_w": "mlp.gate_proj", "up_w": "mlp.up_proj", "down_w": "mlp.down_proj"}
_ALIASES = {**{k: v for k, v in TARGETS.items()}, **{v: v for v in TARGETS.values()},
            **{n.split(".")[-1]: k for k, n in PEFT_NAMES.items()}}
SEP = "@lora_"


def target_keys(targets) -> list[str]:
    """['q', 'v_proj', 'down_w', ...] -> our projection keys; unknown names are bad input."""
    if not targets:
        raise MtrError("lora.targets is empty: name at least one of " + ", ".join(TARGETS))
    out = []
    for t in targets:
        k = _ALIASES.get(str(t))
        if k is None:
            raise MtrError(f"lora.targets: unknown target '{t}' (known: {', '.join(TARGETS)}, or peft's q_proj ... down_proj)")
        if k not in out:
            out.append(k)
    return out


def validate(lc) -> None:
    """One-line errors for a `lora:` config section (see config.LoraConfig)."""
    if not lc.enabled:
        return
    if not isinstance(lc.rank, int) or lc.rank < 1:
        raise MtrError(f"lora.rank={lc.rank!r}: must be an integer >= 1")
    if not lc.alpha > 0:
        raise MtrError(f"lora.alpha={lc.alpha!r}: must be > 0")
    if not isinstance(lc.dropout, (int, float)) or not 0.0 <= lc.dropout < 1.0:
        raise MtrError(f"lora.dropout={lc.dropout!r}: must be in [0, 1)")
    if lc.base_dtype not in ("float32", "bfloat16"):
        raise MtrError(f"lora.base_dtype={lc.base_dtype!r}: expected float32 or bfloat16")
    if getattr(lc, "token_init", "base") not in ("base", "pieces"):
        raise MtrError(f"lora.token_init={lc.token_init!r}: expected base or pieces")
    if lc.base_quant not in ("none", "int8"):
        raise MtrError(f"lora.base_quant={lc.base_quant!r}: expected none or int8")
    target_keys(lc.targets)


def adapter_specs(cfg, targets: list[str], rank: int) -> dict:
    """{"layers": {"q_w@lora_a": (shape, logical axes), ...}} for the given projection keys."""
    from mtr_jax.model.qwen2 import param_specs

    layers = param_specs(cfg)["layers"]
    out = {}
    for k in targets:
        (L, din, dout), (la, ain, aout) = layers[k]
        out[k + SEP + "a"] = ((L, din, rank), (la, ain, "lora_rank"))
        out[k + SEP + "b"] = ((L, rank, dout), (la, "lora_rank", aout))
    return {"layers": out}


def init_adapters(cfg, targets, rank: int, key) -> dict:
    """a ~ N(0, 1/in) (kaiming-style, as peft's default init scales it), b = 0: a no-op at step 0."""
    specs = adapter_specs(cfg, list(targets), rank)["layers"]
    keys = jax.random.split(key, len(specs))
    out = {}
    for (name, (shape, _)), k in zip(sorted(specs.items()), keys):
        if name.endswith("a"):
            out[name] = jax.random.normal(k, shape, jnp.float32) / np.sqrt(shape[1])
        else:
            out[name] = jnp.zeros(shape, jnp.float32)
    return {"layers": out}


ROWS = "@rows"


def token_rows(base: dict, token_ids) -> dict:
    """The trainable copies of the base's rows for `token_ids`: {"embed@rows": [k, E], "lm_head@rows": [k, E]}."""
    ids = jnp.asarray(list(token_ids), jnp.int32)
    out = {"embed" + ROWS: base["embed"][ids].astype(jnp.float32)}
    if "lm_head" in base:
        out["lm_head" + ROWS] = base["lm_head"][:, ids].T.astype(jnp.float32)
    return out


def with_adapters(base: dict, adapters: dict | None, token_ids=(), patch_rows: bool = False) -> dict:
    """The params `forward` takes: the base weights plus the adapter arrays inside `layers`, and
    trainable token rows (if any) written into `embed` / `lm_head` at `token_ids`. patch_rows (the
    training losses): the rows ride beside the untouched base as a patch (`qwen2.PATCH_IDS`), the
    same numbers without a dense [V, E] gradient of the embedding."""
    if not adapters:
        return base
    out = dict(base, layers={**base["layers"], **adapters.get("layers", {})})
    if "embed" + ROWS in adapters:
        ids = jnp.asarray(list(token_ids), jnp.int32)
        if ids.shape[0] != adapters["embed" + ROWS].shape[0]:
            raise MtrError(f"lora: {adapters['embed' + ROWS].shape[0]} trainable token rows but {ids.shape[0]} token ids")
        if patch_rows:
            from mtr_jax.model.qwen2 import PATCH_IDS

            out[PATCH_IDS] = ids
            for name in ("embed", "lm_head"):
                if name + ROWS in adapters:
                    out[name + ROWS] = adapters[name + ROWS].astype(base[name].dtype)
            return out
        out["embed"] = base["embed"].at[ids].set(adapters["embed" + ROWS].astype(base["embed"].dtype))
        if "lm_head" + ROWS in adapters:
            out["lm_head"] = base["lm_head"].at[:, ids].set(adapters["lm_head" + ROWS].T.astype(base["lm_head"].dtype))
    return out


def dropout_key(seed: int, step: int, micro: int) -> np.ndarray:
    """The key data of one micro-batch's LoRA dropout: a function of (run seed, step, micro-batch),
    so a resumed run draws the same masks as an uninterrupted one."""
    k = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), micro)
    return np.asarray(jax.random.key_data(k), np.uint32)


def dropout_key_from(key, i: int) -> np.ndarray:
    """Key data for LoRA dropout derived from a run's own key (raw uint32 or typed)."""
    k = jax.random.fold_in(key, 1_000_003 + i)
    return np.asarray(k if k.dtype == jnp.uint32 else jax.random.key_data(k), np.uint32)


def dropout_keys(seed: int, step: int, micro_batches: int) -> np.ndarray:
    return np.stack([dropout_key(seed, step, a) for a in range(micro_batches)])


def with_dropout(params: dict, key_data, num_layers: int) -> dict:
    """params whose layers carry one dropout key each (`qwen2._proj` drops the adapters' input)."""
    keys = jax.random.split(jax.random.wrap_key_data(key_data), num_layers)
    return dict(params, layers={**params["layers"], "lora@dropout_key": jax.random.key_data(keys)})


def split_adapters(params: dict) -> tuple[dict, dict]:
    """Inverse of `with_adapters` for the projection adapters: (base, adapters). Token rows
    written by `with_adapters` are part of the base from then on (a GRPO run after LoRA SFT starts
    from them, and its reference model has them: without them it could not emit a tool call)."""
    layers = params["layers"]
    ad = {k: v for k, v in layers.items() if SEP in k}
    base = dict(params, layers={k: v for k, v in layers.items() if SEP not in k})
    return base, ({"layers": ad} if ad else {})


def adapter_keys(adapters: dict) -> list[str]:
    return sorted({k.split(SEP)[0] for k in adapters.get("layers", {})})


def merged(params: dict, alpha: float) -> dict:
    """Base + adapters folded into plain weights (W + a @ b * alpha / r), float32: what export writes."""
    base, ad = split_adapters(params)
    base = dequantized(base)
    if not ad:
        return base
    layers = dict(base["layers"])
    for k in adapter_keys(ad):
        a, b = ad["layers"][k + SEP + "a"], ad["layers"][k + SEP + "b"]
        r = a.shape[-1]
        w = layers[k].astype(jnp.float32)
        layers[k] = (w + jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32)) * (alpha / r)).astype(layers[k].dtype)
    return dict(base, layers=layers)


# ---------------------------------------------------------------------------------------------
# QLoRA base: int8 weights with a float32 scale per output column.

QUANT_KEYS = ("q_w", "k_w", "v_w", "o_w", "gate_w", "up_w", "down_w")


def quantize_base(base: dict) -> dict:
    """Each projection [L, in, out] -> {"int8": int8 [L, in, out], "scale": f32 [L, 1, out]}."""
    layers = dict(base["layers"])
    for k in QUANT_KEYS:
        layers[k] = jax.jit(quantize_weight)(layers[k])
    return dict(base, layers=layers)


def is_quantized(w) -> bool:
    return isinstance(w, dict) and "int8" in w


def dequantize(w, dtype=jnp.float32):
    return (w["int8"].astype(jnp.float32) * w["scale"]).astype(dtype) if is_quantized(w) else w


def dequantized(base: dict) -> dict:
    layers = {k: dequantize(v) for k, v in base["layers"].items()}
    return dict(base, layers=layers)


# ---------------------------------------------------------------------------------------------
# Trainer glue.


def settings(lc, token_ids=()) -> dict:
    """What a checkpoint records of the LoRA run (and a resume must match)."""
    return {"rank": int(lc.rank), "alpha": float(lc.alpha), "dropout": float(lc.dropout), "targets": target_keys(lc.targets),
            "base_quant": lc.base_quant, "base_dtype": lc.base_dtype, "token_ids": [int(t) for t in token_ids]}


def _pieces(tokenizer, text: str) -> list[int]:
    """`text` through the tokenizer's own pre-tokenizer and BPE model, bypassing its added-token
    match (which would return the token itself)."""
    bt = getattr(tokenizer, "backend_tokenizer", None)
    if bt is None:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    parts = [p for p, _ in bt.pre_tokenizer.pre_tokenize_str(text)] if bt.pre_tokenizer else [text]
    return [x.id for p in parts for x in bt.model.tokenize(p)]


def init_rows_from_pieces(params: dict, tokenizer, token_ids) -> dict:
    """Each token's embedding / head row := the mean of the rows of the pieces its text splits into
    ("<tool_call>" -> "<", "tool", "_call", ">"), the usual start for a token the base never
    trained: `<tool_call>` and `</tool_call>` start apart, and near what the model knows of tags.
    (In the Coder-0.5B they start 0.0006 apart; after 8 LoRA SFT steps from there the model
    opened its second call with `</tool_call>` in 41 of 100 held-out episodes.)"""
    import jax.numpy as jnp

    out = dict(params)
    for t in token_ids:
        text = tokenizer.convert_ids_to_tokens(int(t))
        pieces = _pieces(tokenizer, text)
        if not pieces or int(t) in pieces:
            raise MtrError(f"lora.token_init=pieces: {text!r} does not split into other tokens")
        idx = jnp.asarray(pieces, jnp.int32)
        out["embed"] = out["embed"].at[int(t)].set(jnp.mean(out["embed"][idx].astype(jnp.float32), 0).astype(out["embed"].dtype))
        if "lm_head" in out:
            col = jnp.mean(out["lm_head"][:, idx].astype(jnp.float32), 1)
            out["lm_head"] = out["lm_head"].at[:, int(t)].set(col.astype(out["lm_head"].dtype))
    return out


def resolve_tokens(lc, tokenizer) -> tuple:
    """`lora.trainable_tokens` (token strings) -> ids; a string that is not one token is bad input."""
    ids = []
    for t in lc.trainable_tokens or ():
        i = tokenizer.convert_tokens_to_ids(t)
        if i is None or i == getattr(tokenizer, "unk_token_id", None) or tokenizer.convert_ids_to_tokens(i) != t:
            raise MtrError(f"lora.trainable_tokens: {t!r} is not a single token of this tokenizer")
        ids.append(int(i))
    return tuple(ids)


def check_resume(lc, meta: dict, where, token_ids=()) -> None:
    saved = meta.get("lora")
    if saved is not None:
        saved = {"token_ids": [], "dropout": 0.0, **saved}
    now = settings(lc, token_ids) if lc.enabled else None
    if saved != now:
        raise MtrError(f"{where}: LoRA settings {now} do not match the checkpoint's {saved}")


def prepare(lc, model_cfg, params, mesh=None, key=None, token_ids=()):
    """-> (model_cfg with lora_alpha, frozen base, trainable adapters). `token_ids`: rows of the
    embedding / head that train too (see `token_rows`). `params` may already hold
    adapters (a LoRA checkpoint, e.g. GRPO after LoRA SFT): they are the starting point and must
    match the settings. The base is stored in `lora.base_dtype` (int8 with `base_quant: int8`)."""
    validate(lc)
    targets = target_keys(lc.targets)
    base, adapters = split_adapters(params)
    if adapters:
        have = adapter_keys(adapters)
        r = int(next(iter(adapters["layers"].values())).shape[-1] if have else 0)
        if have != sorted(targets) or r != lc.rank:
            raise MtrError(f"lora: the loaded adapters (targets {have}, rank {r}) do not match lora.targets {sorted(targets)} / lora.rank {lc.rank}")
    else:
        key = jax.random.key(0) if key is None else key
        if mesh is not None:
            from mtr_jax.parallel.rules import adapter_shardings

            adapters = jax.jit(init_adapters, static_argnums=(0, 1, 2), out_shardings=adapter_shardings(model_cfg, mesh, targets, lc.rank))(
                model_cfg, tuple(targets), lc.rank, key)
        else:
            adapters = jax.jit(init_adapters, static_argnums=(0, 1, 2))(model_cfg, tuple(targets), lc.rank, key)
    dt = jnp.dtype(lc.base_dtype)
    base = jax.jit(lambda b: jax.tree_util.tree_map(lambda a: a.astype(dt), b))(dequantized(base))
    if token_ids:
        adapters = dict(adapters, **token_rows(base, token_ids))
    if lc.base_quant == "int8":
        base = quantize_base(base)
    return model_cfg.replace(lora_alpha=float(lc.alpha), lora_dropout=float(lc.dropout), param_dtype=lc.base_dtype), base, adapters
