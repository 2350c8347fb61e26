"""The device side of the sampler: pure functions traced under `jit` by `sampler.Sampler`.

`forward_chunk` runs the Qwen2 layers (`mtr_jax.model.qwen2._layer`) over a chunk of C tokens per
row and writes their keys/values into the stacked cache [L, B, Hkv, S, D] *in place*: one scatter
per layer into the whole cache (no per-layer slices re-stacked, so XLA keeps the loop-carried
buffer in place), and padding positions of the chunk (j >= lengths[b]) are scattered to slot S,
i.e. dropped. Dropping matters: a clamped `dynamic_update_slice` near the end of the cache would
shift the write left and overwrite real history.

`decode_loop` is the whole generation as one `lax.while_loop`: feed each row's pending token,
sample the next, check eos / stop sequences / length / cache room, and exit as soon as every row
is done.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtr_jax.model.qwen2 import Qwen2Config, _head, _layer, embed_tokens, scatter_bits

# stop-reason codes (the host side maps them to strings)
RUNNING, EOS, STOP, LENGTH, CACHE_FULL, INACTIVE = 0, 1, 2, 3, 4, 5
REASONS = ("running", "eos", "stop", "length", "cache_full", "inactive")


# query block of a fresh prefill's causal attention (see `forward_chunk(fresh=True)`)
PREFILL_BLOCK = 128


def forward_chunk(params, cfg: Qwen2Config, k_cache, v_cache, end, tokens, lengths, want_logits: bool,
                  fresh: bool = False):
    """Feed tokens [B, C] (row b: its first lengths[b]) at positions end[b]..; returns
    (logits [B, C, V] float32 or None, k_cache, v_cache, end + lengths).
    fresh=True: the cache is empty (end = 0), so the chunk's queries attend to the chunk's own keys,
    causally and block by block, instead of to all S cache slots (a 512-token prompt in a 640-slot
    cache: the attention and its float32 softmax over 512 x 640 become a causal 512 x 512, of which
    the blocks skip the upper triangle). The cache is written the same way."""
    B, C = tokens.shape
    S = k_cache.shape[3]
    j = jnp.arange(C, dtype=jnp.int32)
    positions = end[:, None] + j[None, :]
    slots = jnp.where(j[None, :] < lengths[:, None], positions, S)  # S = out of bounds -> dropped
    rows = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, C))
    if fresh:  # keys = the chunk itself; a padded row's queries past its length are never read
        mask = jnp.broadcast_to(j[None, :] <= j[:, None], (B, C, C))
        lcfg = cfg if cfg.attention_block else cfg.replace(attention_block=PREFILL_BLOCK)
    else:  # a query at position p sees slots <= p: history below end, then the chunk causally
        mask = jnp.arange(S, dtype=jnp.int32)[None, None, :] <= positions[:, :, None]
        lcfg = cfg
    h = embed_tokens(params, tokens)

    def layer(h, lw, i, kc, vc):
        def kv_write(k, v):
            # heads-first cache: k [B, C, Hkv, D] lands at [i, b, :, slot, :]
            kc2 = scatter_bits(kc, (i, rows, slice(None), slots), k)
            vc2 = scatter_bits(vc, (i, rows, slice(None), slots), v)
            if fresh:  # the chunk's own keys and values, as the cache holds them (its dtype)
                return k.astype(kc.dtype), v.astype(vc.dtype), (kc2, vc2)
            return kc2[i], vc2[i], (kc2, vc2)

        h, (kc, vc) = _layer(lcfg, h, lw, positions, mask, kv_write, causal=fresh, heads_first=not fresh)
        return h, kc, vc

    if isinstance(params["layers"], (list, tuple)):  # unstacked per-layer weights (see unstack_layers)
        for i, lw in enumerate(params["layers"]):
            h, k_cache, v_cache = layer(h, lw, i, k_cache, v_cache)
    elif cfg.scan_layers:
        def body(carry, xs):
            h, kc, vc = carry
            lw, i = xs
            return layer(h, lw, i, kc, vc), None

        L = cfg.num_hidden_layers
        (h, k_cache, v_cache), _ = jax.lax.scan(body, (h, k_cache, v_cache), (params["layers"], jnp.arange(L)))
    else:
        for i in range(cfg.num_hidden_layers):
            lw = jax.tree_util.tree_map(lambda a: a[i], params["layers"])
            h, k_cache, v_cache = layer(h, lw, i, k_cache, v_cache)
    logits = _head(cfg, params, h) if want_logits else None
    return logits, k_cache, v_cache, end + lengths.astype(jnp.int32)


def unstack_layers(params):
    """params with `layers` as a list of per-layer dicts. Slicing a stacked [L, ...] weight inside
    the decode loop makes XLA:CPU copy every layer's weights on every step (3x the memory traffic
    of a decode step); slicing once before the loop costs one copy of the layer weights per
    `generate` call (and that much extra memory while it runs)."""
    layers = params["layers"]
    L = jax.tree_util.tree_leaves(layers)[0].shape[0]
    return dict(params, layers=[jax.tree_util.tree_map(lambda a: a[i], layers) for i in range(L)])


# --------------------------------------------------------------------------------------------
# Sampling from one step's logits.


def _largest_threshold(lo, hi, ok, iters: int = 40):
    """Per row, the largest tau in [lo, hi] with ok(tau) true (ok must be monotone: true up to some
    point, false after). Bisection in value space: `iters` passes over the vocabulary, no sort."""

    def body(_, c):
        lo, hi = c
        mid = 0.5 * (lo + hi)
        good = ok(mid)
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    return jnp.where(ok(hi), hi, lo)


def filter_top_k_top_p(scaled, top_k, top_p):
    """Mask (to -inf) what top-k then top-p remove, per row (k, p traced: no recompile per value).
    top_k <= 0 keeps all; top-p keeps the smallest set of most likely tokens of the
    top-k-renormalised distribution whose mass reaches top_p (the most likely token always stays),
    as in HF's warpers. No sort of the 151936-entry vocabulary: each cut is a threshold found by
    bisection on the logit value (40 halvings of the row's range: below float32 resolution), so a
    step costs O(V) passes instead of an O(V log V) sort (ties at the cut are all kept, as with a sort)."""
    V = scaled.shape[-1]
    finite = jnp.where(jnp.isfinite(scaled), scaled, jnp.inf)
    lo0 = jnp.min(finite, axis=-1, keepdims=True)
    hi0 = jnp.max(scaled, axis=-1, keepdims=True)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)[:, None]
    # top-k: the largest tau with at least k logits >= tau is the k-th largest logit
    t_k = _largest_threshold(lo0, hi0, lambda t: jnp.sum(scaled >= t, axis=-1, keepdims=True) >= k)
    kept = jnp.where(scaled >= t_k, scaled, -jnp.inf)
    p = jax.nn.softmax(kept, axis=-1)
    # top-p: the largest tau whose kept mass {p: logit >= tau} still reaches top_p
    mass = lambda t: jnp.sum(jnp.where(kept >= t, p, 0.0), axis=-1, keepdims=True) >= top_p[:, None]
    t_p = _largest_threshold(t_k, hi0, mass)
    return jnp.where(scaled >= jnp.maximum(t_k, t_p), scaled, -jnp.inf)


def sample_token(logits, key, temperature, top_k, top_p, greedy, *, all_greedy: bool, use_filter: bool):
    """logits [B, V] float32 -> (token, logprob under the sampled distribution, plain logprob at
    temperature 1, tempered logprob: log_softmax(logits / temperature), unfiltered, which is what
    the trainer computes for the policy at that temperature; greedy rows use temperature 1).
    Greedy rows take the argmax; their sampled distribution is a point mass (logprob 0)."""
    plain = jax.nn.log_softmax(logits, axis=-1)
    g_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if all_greedy:
        tok, lp = g_tok, jnp.zeros(logits.shape[0], jnp.float32)
        plp = jnp.take_along_axis(plain, tok[:, None], axis=-1)[:, 0]
        return tok, lp, plp, plp
    t = jnp.where(greedy, 1.0, temperature)
    tempered = logits / t[:, None]
    scaled = filter_top_k_top_p(tempered, top_k, top_p) if use_filter else tempered
    s_tok = jnp.argmax(scaled + jax.random.gumbel(key, scaled.shape, jnp.float32), axis=-1).astype(jnp.int32)
    s_lp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), s_tok[:, None], axis=-1)[:, 0]
    tok = jnp.where(greedy, g_tok, s_tok)
    lp = jnp.where(greedy, 0.0, s_lp)
    plp = jnp.take_along_axis(plain, tok[:, None], axis=-1)[:, 0]
    tlp = jnp.take_along_axis(jax.nn.log_softmax(tempered, axis=-1), tok[:, None], axis=-1)[:, 0]
    return tok, lp, plp, tlp


# --------------------------------------------------------------------------------------------
# The decode loop.


def decode_loop(params, cfg: Qwen2Config, cache, pending, active, max_new, key, temperature, top_k, top_p, greedy,
                *, out_len: int, eos_ids: tuple, stop_seqs: tuple, all_greedy: bool, use_filter: bool,
                constrain=lambda x: x):
    """Generate up to max_new (traced, <= out_len) tokens per active row.

    Invariant kept by the caller: a row's sequence (cache + 1 pending token) fits in S slots, so a
    row may take a step only while end + 1 < S (its new pending token will still fit).
    Returns (cache, pending, tokens [B, out_len], lengths, reasons, logprobs, plain_logprobs,
    tempered_logprobs).
    """
    B = pending.shape[0]
    S = cache["k"].shape[3]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    Lw = max((len(s) for s in stop_seqs), default=0)
    if Lw:
        stops = jnp.asarray([[-1] * (Lw - len(s)) + list(s) for s in stop_seqs], jnp.int32)  # right-aligned
        stop_real = jnp.asarray([[False] * (Lw - len(s)) + [True] * len(s) for s in stop_seqs])

    reason0 = jnp.where(~active, INACTIVE, jnp.where(cache["end"] + 1 >= S, CACHE_FULL, RUNNING)).astype(jnp.int32)
    carry = dict(
        step=jnp.int32(0), k=cache["k"], v=cache["v"], end=cache["end"], pending=pending, reason=reason0,
        n=jnp.zeros((B,), jnp.int32),
        toks=jnp.zeros((B, out_len), jnp.int32), lp=jnp.zeros((B, out_len), jnp.float32),
        plp=jnp.zeros((B, out_len), jnp.float32), tlp=jnp.zeros((B, out_len), jnp.float32), window=jnp.full((B, max(Lw, 1)), -1, jnp.int32),
    )

    def cond(c):
        return (c["step"] < max_new) & jnp.any(c["reason"] == RUNNING)

    def body(c):
        run = c["reason"] == RUNNING
        logits, k, v, end = forward_chunk(params, cfg, c["k"], c["v"], c["end"], c["pending"][:, None],
                                          run.astype(jnp.int32), want_logits=True)
        k, v = constrain(k), constrain(v)
        tok, lp, plp, tlp = sample_token(logits[:, 0], jax.random.fold_in(key, c["step"]), temperature, top_k, top_p,
                                    greedy, all_greedy=all_greedy, use_filter=use_filter)
        step = c["step"]
        col = lambda buf, x: jax.lax.dynamic_update_slice(buf, jnp.where(run, x, buf[:, step])[:, None], (0, step))
        n = c["n"] + run.astype(jnp.int32)
        window = jnp.concatenate([c["window"][:, 1:], tok[:, None]], axis=1)
        is_eos = jnp.any(tok[:, None] == eos[None, :], axis=-1)
        if Lw:
            hit = jnp.where(stop_real[None], window[:, None, :] == stops[None], True)
            is_stop = jnp.any(jnp.all(hit, axis=-1), axis=-1)
        else:
            is_stop = jnp.zeros_like(is_eos)
        new_reason = jnp.select(
            [is_eos, is_stop, n >= max_new, end + 1 >= S], [EOS, STOP, LENGTH, CACHE_FULL], RUNNING
        ).astype(jnp.int32)
        return dict(
            step=step + 1, k=k, v=v, end=end, pending=jnp.where(run, tok, c["pending"]),
            reason=jnp.where(run, new_reason, c["reason"]), n=n,
            toks=col(c["toks"], tok), lp=col(c["lp"], lp), plp=col(c["plp"], plp), tlp=col(c["tlp"], tlp),
            window=jnp.where(run[:, None], window, c["window"]),
        )

    c = jax.lax.while_loop(cond, body, carry)
    # rows still running when the loop ended hit max_new (can only happen with max_new == 0)
    reason = jnp.where(c["reason"] == RUNNING, LENGTH, c["reason"])
    new_cache = {"k": c["k"], "v": c["v"], "end": c["end"]}
    return new_cache, c["pending"], c["toks"], c["n"], reason, c["lp"], c["plp"], c["tlp"]
