"""train.optim.AdamW.apply (the fused, chunked update the train step uses) against optax's own
`update` + `apply_updates` on the same state: the oracle is optax, step for step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtr_jax.config import OptimConfig
from mtr_jax.train import optim


def _tree(rng, scale=1.0):
    # a leaf below the chunk size, one that splits evenly, one whose size forces an odd chunk count
    return {"small": jnp.asarray(rng.normal(size=(5, 7)) * scale, jnp.float32),
            "stack": {"w": jnp.asarray(rng.normal(size=(4, 8, 16)) * scale, jnp.float32)},
            "odd": jnp.asarray(rng.normal(size=(3, 67)) * scale, jnp.float32)}


@pytest.mark.parametrize("mu_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("clip_norm", [0.0, 1.0])
def test_fused_adamw_equals_optax(monkeypatch, mu_dtype, clip_norm):
    monkeypatch.setattr(optim, "CHUNK", 64)  # the large-leaf loop runs on test-sized leaves
    cfg = OptimConfig(lr=3e-2, warmup_steps=2, weight_decay=0.1, b1=0.9, b2=0.95, clip_norm=clip_norm,
                      schedule="cosine", mu_dtype=mu_dtype)
    tx, _ = optim.make_optimizer(cfg, 6)
    rng = np.random.default_rng(0)
    params = _tree(rng)
    ours_p, ours_s = params, tx.init(params)
    ref_p, ref_s = params, tx.init(params)
    apply = jax.jit(tx.apply)

    @jax.jit
    def ref_step(g, s, p):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    clipped = 0
    for step in range(6):
        g = _tree(rng, scale=0.01 if step % 2 else 3.0)  # odd steps under the clip norm, even ones over
        gnorm = optax.tree.norm(g)
        clipped += bool(clip_norm and gnorm > clip_norm)
        ours_p, ours_s = apply(g, ours_s, ours_p, gnorm)
        ref_p, ref_s = ref_step(g, ref_s, ref_p)
        for a, b in zip(jax.tree.leaves(ours_s), jax.tree.leaves(ref_s)):  # the moments: optax's to the ulp
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-7)
        for a, b in zip(jax.tree.leaves(ours_p), jax.tree.leaves(ref_p)):
            assert a.dtype == b.dtype and a.shape == b.shape
            # a bfloat16 first moment: the update reads the stored (rounded) moment where optax
            # reads it before the cast: 2^-9 relative of an update of at most ~lr * 5 a step
            atol = 1e-7 if mu_dtype == "float32" else (step + 1) * cfg.lr * 5 * 2.0**-9
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=atol)
    assert jax.tree.structure(ours_s) == jax.tree.structure(ref_s)  # optax's state layout: checkpoints unchanged
    assert int(ours_s[1][0].count) == 6 and int(ours_s[1][2].count) == 6
    assert clipped == (3 if clip_norm else 0)
    moved = np.abs(np.asarray(ours_p["odd"]) - np.asarray(params["odd"])).max()
    assert moved > 1e-3  # the parameters did move: the comparison is not of two no-ops


def test_update_tree_is_not_materialised(monkeypatch):
    """The point of `apply`: at the real leaf sizes the compiled update holds no params-sized
    temporaries (optax's update materialises the whole update tree)."""
    monkeypatch.setattr(optim, "CHUNK", 1 << 18)  # 1 MB chunks of 32 MB leaves
    cfg = OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant", mu_dtype="bfloat16")
    tx, _ = optim.make_optimizer(cfg, 10)
    params = {"head": jax.ShapeDtypeStruct((8192, 1024), jnp.float32),
              "mlp": jax.ShapeDtypeStruct((4, 1024, 2048), jnp.float32)}
    opt = jax.eval_shape(tx.init, params)
    n_bytes = 4 * (8192 * 1024 + 4 * 1024 * 2048)

    # params first, as the train step takes them: donated buffers pair with outputs in order
    def ours(p, o, g):
        return tx.apply(g, o, p, optax.tree.norm(g))

    def ref(p, o, g):
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    def temp(f):
        m = jax.jit(f, donate_argnums=(0, 1)).lower(params, opt, params).compile().memory_analysis()
        return m.temp_size_in_bytes

    assert temp(ref) > 0.9 * n_bytes  # the oracle's update tree is there: the probe can see it
    # a few chunks, and the largest first moment's uint16 view (a copy on XLA:CPU): 16 MB of 64
    assert temp(ours) < 0.3 * n_bytes
