"""Copy-ready init (an experiment, not used by `mtr demo`): plant an induction circuit in a random Qwen2.

Layer 0, kv head 0: a previous-token head. Its q/k come from the biases only; RoPE rotates them so
the score peaks one position back (weights over the high-frequency RoPE pairs from a small LP
that maximises the margin over every other distance). Its V/O copy a random projection of the
previous token into a reserved residual channel (the last head_dim dims; token embeddings start at
zero there). Layer 1, kv head 0: an induction head; q reads the current token, k reads the
channel, both through the low-frequency RoPE pairs (content, nearly position-free with theta=1e6),
so it attends to the position after an earlier copy of the current token; V/O write that token's
embedding back (tied embeddings: its logit rises). `s` scales embeddings and V up (and the final
norm down) so AdamW's per-step moves do not erase the circuit at lr 3e-3.
"""
import numpy as np
import jax, jax.numpy as jnp
from scipy.optimize import linprog

def _lp(inv, max_len, offset=1):
    d = np.array([x for x in range(max_len) if x != offset]); half = len(inv)
    A = 1 - np.cos((d - offset)[:, None] * inv[None, :])
    c = np.zeros(half + 1); c[-1] = -1
    A_ub = np.concatenate([-A, np.ones((len(d), 1))], axis=1)
    res = linprog(c, A_ub=A_ub, b_ub=np.zeros(len(d)), A_eq=[[1.0] * half + [0.0]], b_eq=[1.0], bounds=[(0, None)] * half + [(None, None)])
    return res.x[:half], res.x[-1]

def plant_copy(params, cfg, seed=0, emb_std=0.02, final_norm=1.0, s=1.0, prev_margin=10.0, match=8.0, alpha=1.0, delta=1.0, n_lo=8):
    E, D, H, Hkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    rep = H // Hkv; half = D // 2
    C = D  # width of the previous-token channel in the residual
    tok = E - C
    rng = np.random.default_rng(seed)
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, D, 2) / D))
    hi = half - n_lo  # pairs [0, hi) are high frequency (position), [hi, half) low frequency (content)
    p = {k: np.array(v, np.float32) for k, v in params["layers"].items()}
    emb = np.asarray(params["embed"], np.float32) * (emb_std / 0.02); emb[:, tok:] = 0.0
    # layer 0, q heads 0..rep-1 / kv head 0: attend to the previous position
    w, t = _lp(inv[:hi], cfg.max_position_embeddings)
    amp = np.sqrt(w * prev_margin / (t * D ** -0.5))
    kb = np.zeros(D); qb = np.zeros(D)
    kb[:hi] = amp; qb[:hi] = amp * np.cos(-inv[:hi]); qb[half:half + hi] = amp * np.sin(-inv[:hi])
    p["k_w"][0][:, :D] = 0; p["k_b"][0][:D] = kb
    for h in range(rep):
        p["q_w"][0][:, h * D:(h + 1) * D] = 0; p["q_b"][0][h * D:(h + 1) * D] = qb
    P = s * rng.standard_normal((tok, D)) / np.sqrt(tok)  # token space -> D
    p["v_w"][0][:, :D] = 0; p["v_w"][0][:tok, :D] = P
    p["o_w"][0][:rep * D, :] = 0
    p["o_w"][0][:D, tok:] = alpha * np.eye(D)  # head 0 writes P x_prev into the channel
    # layer 1, q heads 0..rep-1 / kv head 0: attend to where the previous token equals this token
    lo = [i for i in range(hi, half)] + [half + i for i in range(hi, half)]  # low-frequency dims
    Pm = P[:, :len(lo)] / s  # match through the first 2*n_lo coordinates of P
    p["q_w"][1][:, :rep * D] = 0; p["q_b"][1][:rep * D] = 0
    for j, dim in enumerate(lo):
        p["q_w"][1][:tok, dim] = match * Pm[:, j]
    p["k_w"][1][:, :D] = 0; p["k_b"][1][:D] = 0
    for j, dim in enumerate(lo):
        p["k_w"][1][tok + j, dim] = match / s
    P2 = rng.standard_normal((tok, D)) / np.sqrt(tok)
    p["v_w"][1][:, :D] = 0; p["v_w"][1][:tok, :D] = s * P2
    p["o_w"][1][:rep * D, :] = 0
    p["o_w"][1][:D, :tok] = delta * P2.T
    layers = {k: jnp.asarray(v, params["layers"][k].dtype) for k, v in p.items()}
    return {**params, "final_norm": jnp.full_like(params["final_norm"], final_norm), "embed": jnp.asarray(emb, params["embed"].dtype), "layers": layers}
