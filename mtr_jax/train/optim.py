"""The optimiser both trainers use: clip -> AdamW with warmup + cosine (or constant).

`make_optimizer` returns an optax transformation (its `init` and its state layout are optax's, so
checkpoints and tools that read optax states keep working) with one addition, `apply(grads, state,
params, gnorm) -> (params, state)`, which the train step uses: the same update written into the
donated param and moment buffers, a large leaf a chunk at a time. optax's `update` +
`apply_updates` materialise a whole update tree (and copies of the moments) beside the gradients:
on the real Qwen2.5-0.5B SFT step (4 x 1024, remat) that is where the step peaked, at 11.74 GiB
compiled; with `apply` the peak is the backward pass, 9.82 GiB (`mtr_jax.bench.plan_check`).
Arithmetic: optax's, in optax's order (tests/test_optim.py checks it step for step), except that
with `mu_dtype: bfloat16` the update reads the first moment as stored (rounded to bfloat16), where
optax reads it before the cast: a 2^-9 relative difference in the update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


class AdamW(optax.GradientTransformation):
    """optax.chain(clip_by_global_norm, adamw) plus an in-place `apply` (see the module docstring)."""

    def __new__(cls, cfg: OptimConfig, sched):
        tx = optax.chain(
            optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
            optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mu_dtype=cfg.mu_dtype),
        )
        self = super().__new__(cls, tx.init, tx.update)
        self._cfg, self._sched = cfg, sched
        return self

    def apply(self, grads, state, params, gnorm):
        """One AdamW step (see the module docstring). `gnorm` is the global gradient norm the
        caller already has (`optax.tree.norm(grads)`)."""
        c = self._cfg
        clip_state, (adam, decay_state, sched_state) = state
        count = optax.safe_increment(adam.count)
        bc1 = 1 - c.b1 ** count  # float32, as optax.tree.bias_correction computes it
        bc2 = 1 - c.b2 ** count
        lr = self._sched(sched_state.count)
        clipping = c.clip_norm > 0
        trigger = gnorm < c.clip_norm if clipping else None

        def clip(g):
            return jax.lax.select(trigger, g, (g / gnorm.astype(g.dtype)) * c.clip_norm) if clipping else g

        def moments(g, m, v):  # optax.tree.update_moment(_per_elem_norm), stored in the state's dtypes
            g = clip(g)
            return ((1 - c.b1) * g + c.b1 * m).astype(m.dtype), ((1 - c.b2) * (g ** 2) + c.b2 * v).astype(v.dtype)

        def param(p, m_new, v_new):
            m_new = m_new.astype(jnp.float32)
            u = (m_new / bc1.astype(m_new.dtype)) / (jnp.sqrt(v_new / bc2.astype(v_new.dtype) + 0.0) + 1e-8)
            u = u + c.weight_decay * p
            u = jnp.array(-lr, dtype=u.dtype) * u
            return jnp.asarray(p + u).astype(p.dtype)

        def leaf(p, g, m, v):
            if jax.device_count() > 1 or p.size <= CHUNK:  # a sharded leaf is not reshaped into chunks
                m, v = moments(g, m, v)
                return param(p, m, v), m, v
            return _in_chunks(moments, param, p, g, m, v)

        treedef = jax.tree.structure(params)
        out = [leaf(*a) for a in zip(*(treedef.flatten_up_to(t) for t in (params, grads, adam.mu, adam.nu)))]
        new_p, mu, nu = (treedef.unflatten(list(x)) for x in zip(*out))
        new_adam = optax.ScaleByAdamState(count=count, mu=mu, nu=nu)
        new_sched = optax.ScaleByScheduleState(count=optax.safe_increment(sched_state.count))
        return new_p, (clip_state, (new_adam, decay_state, new_sched))


CHUNK = 1 << 22  # elements of a leaf updated at a time: the update's temporaries are 16 MB, not a params-sized tree


def _in_chunks(moments, param, p, g, m, v):
    """The update of one large leaf in chunks of <= CHUNK elements, written by a loop into the
    (donated) buffers of p, m and v. One elementwise program over the whole leaf does the same
    arithmetic, but XLA then materialises its intermediates (optax's update tree; copies of the old
    moments) for every leaf at once: 6 bytes a parameter at the train step's peak."""
    S = p.size
    n = -(-S // CHUNK)
    while S % n:  # the fewest chunks that divide the leaf evenly (a row-major reshape is free)
        n += 1
    # bfloat16 buffers travel as their uint16 bits: XLA:CPU widens a bfloat16 dynamic-update-slice
    # to float32 over the WHOLE buffer (and back) at every iteration; an integer one is in place
    def flat(x):
        x = x.reshape(n, S // n)
        return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x

    def take(x, k, dtype):
        c = jax.lax.dynamic_index_in_dim(x, k, keepdims=True)
        return jax.lax.bitcast_convert_type(c, dtype) if c.dtype != dtype else c

    def put(x, c, i):
        c = jax.lax.bitcast_convert_type(c, x.dtype) if c.dtype != x.dtype else c
        return jax.lax.dynamic_update_index_in_dim(x, c, i, 0)

    g2 = flat(g)

    def body(i, carry):
        p2, m2, v2, j = carry
        mn, vn = moments(take(g2, i, g.dtype), take(m2, i, m.dtype), take(v2, i, v.dtype))
        m2, v2 = put(m2, mn, i), put(v2, vn, i)
        # the param update reads the new moments back from their buffers, at j (== i, but XLA
        # cannot prove it): else it refolds the moment arithmetic into the param write, reading
        # the old moments after they were overwritten, and XLA copies all of them every iteration
        p2 = put(p2, param(take(p2, i, p.dtype), take(m2, j, m.dtype), take(v2, j, v.dtype)), i)
        return p2, m2, v2, j + 1

    p2, m2, v2, _ = jax.lax.fori_loop(0, n, body, (flat(p), flat(m), flat(v), jnp.int32(0)))
    back = lambda x2, x: jax.lax.bitcast_convert_type(x2, x.dtype).reshape(x.shape)  # noqa: E731
    return back(p2, p), back(m2, m), back(v2, v)


def make_optimizer(cfg: OptimConfig, total_steps: int):
    """Returns (AdamW, schedule). Moments live in float32 whatever the param dtype (the first in
    bfloat16 with `optim.mu_dtype: bfloat16`)."""
    if cfg.lr <= 0:
        raise MtrError(f"optim.lr={cfg.lr}: must be > 0")
    if cfg.mu_dtype not in ("float32", "bfloat16"):
        raise MtrError(f"optim.mu_dtype={cfg.mu_dtype!r}: expected float32 or bfloat16")
    sched = learning_rate(cfg, total_steps)
    return AdamW(cfg, sched), sched
