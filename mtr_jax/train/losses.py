"""Losses for SFT and GRPO, written as (numerator, denominator) so gradient accumulation is exact.

Every loss here returns `num` (a sum over the micro-batch) and the caller divides by the
denominator of the WHOLE optimiser step (`*_denominator` computes it from the full batch), so a
step gives the same loss and gradient whatever its micro-batch split.

GRPO (per generated token t of episode i, mask m_it = 1 on tokens the policy generated):
    rho_it   = exp(logp_it - logp_old_it)
    pg_it    = -min(rho_it * A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) * A_i)
    kl_it    = exp(logp_ref_it - logp_it) - (logp_ref_it - logp_it) - 1         (k3 estimator)
    l_it     = pg_it + beta * kl_it
Aggregation ("loss_agg"), with N episodes and L_max = the generation-length budget:
    token-mean               : sum_i sum_t m_it l_it / sum_i sum_t m_it
    seq-mean-token-mean      : (1/N) sum_i [ sum_t m_it l_it / sum_t m_it ]
    seq-mean-token-sum-norm  : (1/N) sum_i [ sum_t m_it l_it / L_max ]             (Dr. GRPO)
Advantages: A_i = (r_i - mean_group(r)) / (std_group(r) + eps), std unbiased (ddof=1, as TRL and
verl); with scale_std=False (Dr. GRPO) A_i = r_i - mean_group(r). Episodes left out (`valid`,
`grpo.drop_void_turns`) get A_i = 0 and do not enter their group's mean or std.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mtr_jax.model import qwen2

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _logp_entropy(logits, targets, temperature: float):
    """log p(targets) under softmax(logits / temperature), and that distribution's entropy."""
    if temperature != 1.0:
        logits = logits / temperature
    logz = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - logz
    probs = jax.nn.softmax(logits, axis=-1)
    return logp, logz - jnp.sum(probs * logits, axis=-1)


VOCAB_CHUNK = 32768  # columns of the LM head per chunk of `head_logp_entropy` (its largest divisor of V below this)


def vocab_chunk(vocab: int, target: int = VOCAB_CHUNK) -> int:
    """The largest divisor of `vocab` that is <= target (151936 -> 18992: 8 chunks)."""
    if vocab <= target:
        return vocab
    best = 1
    for c in range(1, int(vocab ** 0.5) + 1):
        if vocab % c == 0:
            for d in (c, vocab // c):
                if d <= target:
                    best = max(best, d)
    return best


def head_logp_entropy(params, cfg, h, targets, temperature: float = 1.0, chunk: int | None = None):
    """log p(targets) and the entropy of softmax(head(h) / temperature), never holding more than
    [N, chunk] logits: an online logsumexp over vocabulary chunks in a `lax.scan`, with a hand-written
    backward (`_chunked_head`) that recomputes each chunk's logits from the saved log-normaliser, as
    a fused cross-entropy kernel does. h: [..., E] final hidden states (before the final norm);
    targets: [...]. Params with trainable token rows in patch form (`qwen2.head_patch`) get those
    columns from the rows, and the frozen head's weight gradient is never formed."""
    lead = h.shape[:-1]
    x = qwen2.rms_norm(h.reshape(-1, h.shape[-1]), params["final_norm"], cfg.rms_norm_eps).astype(cfg.compute_dtype)
    tgt = targets.reshape(-1)
    tied = cfg.tie_word_embeddings
    w = params["embed"] if tied else params["lm_head"]  # [V, E] tied, [E, V] untied
    patch = qwen2.head_patch(params, cfg)  # (rows [K, E], ids [K]) or None
    V = cfg.vocab_size
    c = chunk or vocab_chunk(V)
    if V % c:
        raise ValueError(f"vocab chunk {c} does not divide vocab {V}")
    if c == V:  # one chunk: the plain head (no scan; what a small vocabulary costs anyway)
        logits = qwen2.mp_einsum("ne,ve->nv" if tied else "ne,ev->nv", x, w, cfg.compute_dtype)
        if patch is not None:
            rows, ids = patch
            logits = logits.at[:, ids].set(qwen2.mp_einsum("ne,ke->nk", x, rows, cfg.compute_dtype))
        logp, ent = _logp_entropy(logits, tgt, temperature)
        return logp.reshape(lead), ent.reshape(lead)
    # the weight as [chunks, c, E] (tied) or [chunks, E, c] in the compute dtype, so the scan reads
    # one contiguous block per chunk (AD takes the gradient back to w's layout and dtype)
    wc = w.astype(cfg.compute_dtype)
    wc = wc.reshape(V // c, c, -1) if tied else wc.reshape(-1, V // c, c).transpose(1, 0, 2)
    if patch is None:
        rows, ids = jnp.zeros((0, x.shape[-1]), cfg.compute_dtype), jnp.zeros((0,), jnp.int32)
    else:
        rows, ids = patch[0].astype(cfg.compute_dtype), patch[1]
    logp, ent = _chunked_head(x, wc, rows, ids, tgt, tied, float(temperature), patch is None)
    return logp.reshape(lead), ent.reshape(lead)


_MASKED = -1e30  # a patched-out column's logit: exp gives 0 and 0 * _MASKED is 0 (-inf would give NaN)


def _chunk_logits(x, wc, tied: bool, temperature: float):
    """[N, c] float32 logits of one vocabulary chunk wc ([c, E] tied, [E, c] untied)."""
    logits = qwen2._lp_dot("ne,ve->nv" if tied else "ne,ev->nv", x, wc)
    return logits / temperature if temperature != 1.0 else logits


def _base_chunk(x, w_i, i, ids, tied, temperature):
    """Chunk i's logits from the base weight, the patched columns (ids) masked out."""
    logits = _chunk_logits(x, w_i, tied, temperature)
    if ids.shape[0] == 0:
        return logits
    c = logits.shape[1]
    gone = jnp.any((i * c + jnp.arange(c))[:, None] == ids[None, :], axis=-1)
    return jnp.where(gone[None, :], _MASKED, logits)


def _merge(carry, logits, t_add):
    """Fold one block of logits [N, c] into the online (max, sum exp, sum exp * z, target logit)."""
    m, s, u, t = carry
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    scale = jnp.exp(m - m_new)
    z = logits - m_new[:, None]
    e = jnp.exp(z)
    # u = sum e * (logit - running max): kept relative to the max so the entropy
    # log s - u / s does not cancel two logit-sized numbers
    dm = jnp.where(s > 0, m - m_new, 0.0)  # first chunk: m = -inf and s = 0 (no 0 * inf)
    u = scale * (u + s * dm) + jnp.sum(e * z, axis=-1)
    s = s * scale + jnp.sum(e, axis=-1)
    return m_new, s, u, t + t_add


def _chunked_head_fwd(x, wc, rows, ids, tgt, tied, temperature, need_dw):
    N, c = x.shape[0], wc.shape[1 if tied else 2]
    in_rows = jnp.any(tgt[:, None] == ids[None, :], axis=-1)  # targets the patch rows score

    def body(carry, xs):
        w_i, i = xs
        logits = _base_chunk(x, w_i, i, ids, tied, temperature)
        local = tgt - i * c
        hit = (local >= 0) & (local < c) & ~in_rows
        t = jnp.where(hit, jnp.take_along_axis(logits, jnp.clip(local, 0, c - 1)[:, None], axis=-1)[:, 0], 0.0)
        return _merge(carry, logits, t), None

    init = (jnp.full((N,), -jnp.inf, jnp.float32), jnp.zeros((N,), jnp.float32), jnp.zeros((N,), jnp.float32),
            jnp.zeros((N,), jnp.float32))
    carry, _ = jax.lax.scan(body, init, (wc, jnp.arange(wc.shape[0])))
    if ids.shape[0]:  # the patch rows: one more (small) block
        logits = _chunk_logits(x, rows, True, temperature)
        carry = _merge(carry, logits, jnp.sum(jnp.where(tgt[:, None] == ids[None, :], logits, 0.0), axis=-1))
    m, s, u, t = carry
    logz = m + jnp.log(s)
    logp, ent = t - logz, jnp.log(s) - u / s
    return (logp, ent), (x, wc, rows, ids, tgt, logz, ent)


def _dlogits(z, onehot, g_lp, g_ent, ent, temperature):
    """d(g_lp . logp + g_ent . H) / d logits, from z = log p: onehot * g_lp - p (g_lp + g_ent (z + H))."""
    p = jnp.exp(z)
    d = jnp.where(onehot, g_lp[:, None], 0.0) - p * (g_lp[:, None] + g_ent[:, None] * (z + ent[:, None]))
    return d / temperature if temperature != 1.0 else d


def _chunked_head_bwd(tied, temperature, need_dw, res, g):
    """Per chunk, from the saved log-normaliser: p = softmax, and with z = log p, H = entropy,
    d logp / d logit_j = 1[j = target] - p_j and d H / d logit_j = -p_j (z_j + H); then the two
    matmuls of the head's backward in x's dtype with float32 accumulation. need_dw=False (a frozen
    head, its trainable columns patched in as rows): the weight's gradient is not formed at all."""
    x, wc, rows, ids, tgt, logz, ent = res
    g_lp, g_ent = g
    c = wc.shape[1 if tied else 2]
    in_rows = jnp.any(tgt[:, None] == ids[None, :], axis=-1)

    def body(dx, xs):
        w_i, i = xs
        z = _base_chunk(x, w_i, i, ids, tied, temperature) - logz[:, None]
        onehot = (jnp.arange(c)[None, :] == (tgt - i * c)[:, None]) & ~in_rows[:, None]
        dl = _dlogits(z, onehot, g_lp, g_ent, ent, temperature).astype(x.dtype)
        if tied:
            dx = dx + qwen2._lp_dot("nv,ve->ne", dl, w_i)
            dw_i = qwen2._lp_dot("nv,ne->ve", dl, x) if need_dw else None
        else:
            dx = dx + qwen2._lp_dot("nv,ev->ne", dl, w_i)
            dw_i = qwen2._lp_dot("ne,nv->ev", x, dl) if need_dw else None
        return dx, (dw_i.astype(wc.dtype) if need_dw else None)

    dx, dwc = jax.lax.scan(body, jnp.zeros(x.shape, jnp.float32), (wc, jnp.arange(wc.shape[0])))
    drows = jnp.zeros_like(rows)
    if ids.shape[0]:
        z = _chunk_logits(x, rows, True, temperature) - logz[:, None]
        dl = _dlogits(z, tgt[:, None] == ids[None, :], g_lp, g_ent, ent, temperature).astype(x.dtype)
        dx = dx + qwen2._lp_dot("nk,ke->ne", dl, rows)
        drows = qwen2._lp_dot("nk,ne->ke", dl, x).astype(rows.dtype)
    if dwc is None:  # a frozen head: its cotangent is dropped by the caller
        dwc = jnp.zeros_like(wc)
    return dx.astype(x.dtype), dwc, drows, None, None


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _chunked_head(x, wc, rows, ids, tgt, tied, temperature, need_dw):
    """(log p(tgt), entropy) of softmax(x @ head / temperature) over vocabulary chunks wc, the
    columns `ids` (if any) replaced by x @ rows^T; x: [N, E]."""
    return _chunked_head_fwd(x, wc, rows, ids, tgt, tied, temperature, need_dw)[0]


_chunked_head.defvjp(_chunked_head_fwd, _chunked_head_bwd)


def token_logprobs(params, cfg, tokens, segment_ids=None, positions=None, temperature: float = 1.0):
    """log p(tokens[:, t+1] | tokens[:, :t+1]) for t < T-1, shape [B, T-1], plus the entropy
    (vocabulary-chunked: no [B, T, V] logits)."""
    h = qwen2.hidden_states(params, cfg, tokens, positions, segment_ids)[:, :-1]
    return head_logp_entropy(params, cfg, h, tokens[:, 1:], temperature)


def dense_token_logprobs(params, cfg, tokens, segment_ids=None, positions=None, temperature: float = 1.0):
    """`token_logprobs` through the full [B, T, V] logits (the reference the chunked one is tested against)."""
    logits = qwen2.forward(params, cfg, tokens, positions, segment_ids)[:, :-1]
    return _logp_entropy(logits, tokens[:, 1:], temperature)


def completion_logprobs(params, cfg, prompts, prompt_lens, completions, temperature: float = 1.0):
    """`token_logprobs` of every completion token with each group's shared prompt run once
    (`qwen2.shared_prefix_hidden`): log p(completions[r, j] | prompt, completions[r, :j]), [R, C],
    plus the entropy of each of those predictive distributions."""
    h_last, h_c = qwen2.shared_prefix_hidden(params, cfg, prompts, prompt_lens, completions)
    G = completions.shape[0] // prompts.shape[0]
    # token j is predicted from the state before it: the prompt's last token for j = 0
    h_pred = jnp.concatenate([jnp.repeat(h_last, G, axis=0)[:, None], h_c[:, :-1]], axis=1)
    return head_logp_entropy(params, cfg, h_pred, completions, temperature)


def label_mask(loss_mask, segment_ids):
    """[.., T-1]: position t's next token is a label (an assistant token of the same packed segment)."""
    return loss_mask[..., 1:].astype(bool) & (segment_ids[..., 1:] == segment_ids[..., :-1])


def label_index(loss_mask: np.ndarray, segment_ids: np.ndarray, min_bucket: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Host side: per row, the positions t < T-1 whose next token carries loss, padded to one
    power-of-two bucket K (a few programs over a run). -> (label_idx [.., K] int32, label_w [.., K]
    float32: 1 for a real label, 0 for padding)."""
    m = np.asarray(label_mask(np.asarray(loss_mask), np.asarray(segment_ids)))
    T1 = m.shape[-1]
    need = int(m.sum(-1).max()) if m.size else 0
    K = min_bucket
    while K < need:
        K *= 2
    K = min(K, T1)
    order = np.argsort(~m, axis=-1, kind="stable")[..., :K]  # label positions first, in order
    w = np.take_along_axis(m, order, axis=-1).astype(np.float32)
    return np.where(w > 0, order, 0).astype(np.int32), w


def sft_loss_num(params, cfg, batch):
    """Sum of next-token cross-entropy over assistant tokens. batch: tokens, loss_mask, segment_ids,
    positions [B, T]; loss_mask marks tokens to be PREDICTED (the label side). With `label_idx` /
    `label_w` (from `label_index`) the LM head runs only at those positions, vocabulary-chunked."""
    tokens = batch["tokens"]
    if "label_idx" in batch:
        h = qwen2.hidden_states(params, cfg, tokens, batch["positions"], batch["segment_ids"])
        idx, w = batch["label_idx"], batch["label_w"]
        h_sel = jnp.take_along_axis(h, idx[..., None], axis=1)  # [B, K, E]
        tgt = jnp.take_along_axis(tokens, idx + 1, axis=1)
        logp, _ = head_logp_entropy(params, cfg, h_sel, tgt)
        return -jnp.sum(logp * w), jnp.sum(w)
    logp, _ = token_logprobs(params, cfg, tokens, batch["segment_ids"], batch["positions"])
    m = label_mask(batch["loss_mask"], batch["segment_ids"]).astype(jnp.float32)
    return -jnp.sum(logp * m), jnp.sum(m)


def sft_shared_loss_num(params, cfg, batch):
    """`sft_loss_num` in completion coordinates (each group's common prefix run once,
    `data.pipeline.shared_prefix_layout`): mask [R, C] marks completion tokens that are labels."""
    logp, _ = completion_logprobs(params, cfg, batch["prompts"], batch["prompt_lens"], batch["completions"])
    m = batch["mask"].astype(jnp.float32)
    return -jnp.sum(logp * m), jnp.sum(m)


def sft_shared_denominator(batches):
    return jnp.sum(batches["mask"].astype(jnp.float32))


def sft_denominator(batches):
    """Label tokens of a whole step ([A, b, T] arrays), computed inside jit: the SFT loss is the
    mean over every assistant token of the step."""
    return jnp.sum(label_mask(batches["loss_mask"], batches["segment_ids"]))


def grpo_denominator_jnp(batches, loss_agg: str):
    """`grpo_denominator` inside jit over the whole step: generated tokens (token-mean) or real
    episodes (sequence means; padding rows have no tokens at all). Full rows (mask on the label
    side, [.., T]) or completion coordinates (shared prompts: mask [.., C], `episode` per row)."""
    if "episode" in batches:
        return jnp.sum(batches["mask"]) if loss_agg == "token-mean" else jnp.sum(batches["episode"])
    if loss_agg == "token-mean":
        return jnp.sum(batches["mask"][..., 1:])
    return jnp.sum(jnp.any(batches["segment_ids"] > 0, axis=-1))


def group_advantages(rewards: np.ndarray, group_size: int, scale_std: bool = True, eps: float = 1e-6,
                     valid: np.ndarray | None = None) -> np.ndarray:
    """A_i per episode. `valid` (bool per episode) leaves episodes out of their group's statistics and
    gives them A = 0: each group is then scored as if it held only its valid episodes."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    v = np.ones_like(r, bool) if valid is None else np.asarray(valid, bool).reshape(-1, group_size)
    n = v.sum(axis=1, keepdims=True)
    mean = np.where(v, r, 0.0).sum(axis=1, keepdims=True) / np.maximum(n, 1)
    centred = np.where(v, r - mean, 0.0)
    if scale_std:  # unbiased (ddof=1); a group with fewer than 2 valid episodes has std 0
        var = (centred**2).sum(axis=1, keepdims=True) / np.maximum(n - 1, 1)
        std = np.where(n > 1, np.sqrt(var), 0.0)
        centred = centred / (std + eps)
    return centred.reshape(-1).astype(np.float32)


def grpo_per_token(logp, old_logp, ref_logp, adv, eps_low, eps_high, beta):
    ratio = jnp.exp(logp - old_logp)
    a = adv[:, None]
    unclipped = ratio * a
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * a
    pg = -jnp.minimum(unclipped, clipped)
    if beta:
        d = ref_logp - logp
        kl = jnp.exp(d) - d - 1.0
    else:
        kl = jnp.zeros_like(logp)
    is_clipped = (unclipped != clipped).astype(jnp.float32)
    return pg + beta * kl, kl, is_clipped


def grpo_loss_num(logp, old_logp, ref_logp, adv, mask, *, eps_low, eps_high, beta, loss_agg, max_len):
    """Numerator of the GRPO loss for one micro-batch (see module docstring)."""
    mask = mask.astype(jnp.float32)
    per_tok, kl, clipped = grpo_per_token(logp, old_logp, ref_logp, adv, eps_low, eps_high, beta)
    seq_sum = jnp.sum(per_tok * mask, axis=1)
    if loss_agg == "token-mean":
        num = jnp.sum(seq_sum)
    elif loss_agg == "seq-mean-token-mean":
        num = jnp.sum(seq_sum / jnp.maximum(jnp.sum(mask, axis=1), 1.0))
    elif loss_agg == "seq-mean-token-sum-norm":
        num = jnp.sum(seq_sum / float(max_len))
    else:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; expected one of {LOSS_AGGS}")
    stats = {"kl_sum": jnp.sum(kl * mask), "clip_sum": jnp.sum(clipped * mask), "tokens": jnp.sum(mask)}
    return num, stats


def grpo_denominator(mask: np.ndarray, loss_agg: str, n_episodes: int | None = None) -> float:
    """Denominator for a whole optimiser step (all its micro-batches). `n_episodes` counts the real
    episodes when rows were padded to a bucket (padding rows have an all-zero mask)."""
    mask = np.asarray(mask)
    if loss_agg == "token-mean":
        return float(max(mask.sum(), 1.0))
    # sequence means count every real episode, even one with no generated tokens (it adds 0)
    return float(max(mask.shape[0] if n_episodes is None else n_episodes, 1))
