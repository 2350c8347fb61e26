"""The optax optimiser both trainers use: clip -> AdamW with warmup + cosine (or constant)."""

from __future__ import annotations

import optax

from mtr_jax.config import OptimConfig
from mtr_jax.errors import MtrError


def learning_rate(cfg: OptimConfig, total_steps: int):
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1)), optax.constant_schedule(cfg.lr)],
            [max(cfg.warmup_steps, 1)],
        ) if cfg.warmup_steps else optax.constant_schedule(cfg.lr)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if cfg.warmup_steps else cfg.lr, peak_value=cfg.lr,
            warmup_steps=cfg.warmup_steps, decay_steps=max(total_steps, cfg.warmup_steps + 1), end_value=0.1 * cfg.lr,
        )
    raise MtrError(f"optim.schedule={cfg.schedule!r}: expected cosine or constant")


def make_optimizer(cfg: OptimConfig, total_steps: int):
    """Returns (optax transformation, schedule). Moments live in float32 whatever the param dtype
    (the first in bfloat16 with `optim.mu_dtype: bfloat16`)."""
    if cfg.lr <= 0:
        raise MtrError(f"optim.lr={cfg.lr}: must be > 0")
    if cfg.mu_dtype not in ("float32", "bfloat16"):
        raise MtrError(f"optim.mu_dtype={cfg.mu_dtype!r}: expected float32 or bfloat16")
    sched = learning_rate(cfg, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mu_dtype=cfg.mu_dtype),
    )
    return tx, sched
