"""Low-precision matmuls on a CPU without bf16 hardware (qwen2._lp_dot): a large one runs as a float32
matmul of the exact upcasts of its bf16 operands, a small one (decode) stays bf16. Both paths are forced
here with MTR_CPU_BF16_DOT, whatever this CPU has, and checked against each other and against float32."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtr_jax.model import qwen2
from util import tiny_config

BF16, F32 = jnp.bfloat16, jnp.float32


@pytest.fixture
def mode(monkeypatch):
    def set_mode(m: str) -> None:
        monkeypatch.setenv("MTR_CPU_BF16_DOT", m)
        qwen2._cpu_lacks_bf16_dot.cache_clear()

    yield set_mode
    qwen2._cpu_lacks_bf16_dot.cache_clear()  # the next call probes again, with the environment restored


def _dot_operand_dtypes(fn, *args) -> list[str]:
    """The element types of every dot_general's operands in fn's lowered program."""
    text = jax.jit(fn).lower(*args).as_text()
    return re.findall(r"stablehlo\.dot_general.*?: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)", text)


def test_upcast_only_where_it_pays(mode):
    mode("upcast")
    x, w = jnp.zeros((256, 96), BF16), jnp.zeros((96, 512), BF16)
    assert qwen2._upcast_pays("te,ef->tf", x, w)
    assert not qwen2._upcast_pays("te,ef->tf", x[:16], w)  # 16 rows: a decode step
    assert not qwen2._upcast_pays("te,ef->tf", x.astype(F32), w.astype(F32))
    q, k = jnp.zeros((2, 1, 2, 4, 16), BF16), jnp.zeros((2, 512, 2, 16), BF16)
    assert not qwen2._upcast_pays("btgrd,bsgd->bgrts", q, k)  # decode attention: 1 token x 4 heads
    q = jnp.zeros((2, 128, 2, 4, 16), BF16)
    assert qwen2._upcast_pays("btgrd,bsgd->bgrts", q, k)  # prefill attention
    mode("native")
    assert not qwen2._upcast_pays("te,ef->tf", x, w)


@pytest.mark.parametrize("m,want", [("upcast", "f32"), ("native", "bf16")])
def test_forward_and_backward_matmuls_run_in_the_chosen_dtype(mode, m, want):
    mode(m)
    x, w = jnp.ones((256, 160), BF16), jnp.ones((160, 384), BF16)  # every matmul has >= 64 rows a side

    def f(x, w):
        return qwen2.mp_einsum("te,ef->tf", x, w, BF16).sum()

    dots = _dot_operand_dtypes(jax.value_and_grad(f, argnums=(0, 1)), x, w)
    assert len(dots) == 3  # the forward and the two gradient matmuls
    assert all(d == (want, want) for d in dots), dots


def test_upcast_equals_native_bf16_matmul(mode):
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(256, 160), BF16)
    w = jnp.asarray(rng.randn(160, 320) * 0.1, BF16)
    ct = jnp.asarray(rng.randn(256, 320), F32)

    def run():
        out, vjp = jax.vjp(lambda a, b: qwen2.mp_einsum("te,ef->tf", a, b, BF16), x, w)
        return (out, *vjp(ct))

    mode("native")
    ref = jax.jit(lambda: run())()  # a new function each time: jit caches traces per function object
    mode("upcast")
    got = jax.jit(lambda: run())()
    # the same products of bf16 numbers, summed in float32 either way: equal up to the summation order
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(ref[0]), rtol=1e-5, atol=1e-5)
    for g, r in zip(got[1:], ref[1:]):  # gradients are returned in bf16: at most one bf16 rounding apart
        assert g.dtype == r.dtype == BF16
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert np.all(np.abs(g - r) <= 2.0**-7 * np.abs(r) + 1e-6), float(np.max(np.abs(g - r)))


def test_bf16_model_upcast_equals_native_and_tracks_float32(mode):
    """A whole bf16 model (scan, remat, prefill-sized attention) through both paths: the two agree with
    each other more closely than native bf16 agrees with float32, and the upcast path is no further
    from float32 than the native one (a wrong contraction would be off by O(1))."""
    cfg = tiny_config(hidden_size=128, intermediate_size=256, tie_word_embeddings=False, remat=True)
    params = qwen2.init_params(cfg, jax.random.key(3), std=0.1)
    ids = np.random.RandomState(4).randint(0, 256, (2, 160))

    def loss(p, c):
        lp = jax.nn.log_softmax(qwen2.forward(p, c, ids)[:, :-1], -1)
        return -jnp.take_along_axis(lp, ids[:, 1:, None], -1).mean()

    def run(c):
        return jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, c)

    l32, g32 = run(cfg)
    mode("native")
    ln, gn = run(cfg.replace(dtype="bfloat16"))
    mode("upcast")
    lu, gu = run(cfg.replace(dtype="bfloat16"))
    assert abs(float(lu) - float(ln)) <= 1e-3 * abs(float(ln))
    for (path, a), n, u in zip(jax.tree_util.tree_leaves_with_path(g32), jax.tree_util.tree_leaves(gn),
                               jax.tree_util.tree_leaves(gu)):
        def rel(x, ref):
            return float(jnp.linalg.norm(x - ref) / (jnp.linalg.norm(ref) + 1e-12))

        native_to32, upcast_to32, between = rel(n, a), rel(u, a), rel(u, n)
        assert native_to32 < 3e-2, (path, native_to32)
        assert between < native_to32, (path, between, native_to32)
        assert upcast_to32 < 1.25 * native_to32 + 1e-3, (path, upcast_to32, native_to32)


@pytest.mark.parametrize("spec,sa,sb", [
    ("abe,abf->ef", (3, 40, 24), (3, 40, 56)),       # a weight gradient: the token dims lead
    ("ne,nv->ev", (72, 32), (72, 96)),               # the untied head's weight gradient
    ("nv,ne->ve", (72, 96), (72, 32)),               # the tied head's
    ("btgrd,bsgd->bgrts", (2, 16, 2, 3, 8), (2, 16, 2, 8)),  # attention scores, tokens-first layout
    ("bgrts,bsgd->btgrd", (2, 2, 3, 16, 16), (2, 16, 2, 8)),  # probs @ v into tokens-first: left as is
    ("bgrtd,bgrts->bgsd", (2, 2, 3, 16, 8), (2, 2, 3, 16, 16)),  # dk: result would come out transposed
    ("abe,ef->abf", (3, 40, 24), (24, 56)),          # already in order: no copy
])
def test_native_bf16_dot_reordered_operands_run_and_equal_einsum(mode, spec, sa, sb):
    """`_lp_dot` copies a bf16 dot's operands into batch-first / contracting-last order on the CPU
    (XLA:CPU's fast bf16 kernel wants it; a transposed result would fall back to a kernel that has no
    bf16 x bf16 -> f32 and fails at run time). Every spec the model and the head use compiles, runs,
    and gives the float32 einsum of the same bf16 values."""
    mode("native")
    a = jax.random.normal(jax.random.key(0), sa).astype(BF16)
    b = jax.random.normal(jax.random.key(1), sb).astype(BF16)
    got = np.asarray(jax.jit(lambda a, b: qwen2._lp_dot(spec, a, b))(a, b))
    want = np.asarray(jnp.einsum(spec, a.astype(F32), b.astype(F32), precision="highest"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    new_spec, _, _ = qwen2._lhs_contracting_last(spec, a, b)
    ins, out = new_spec.split("->")
    reordered = new_spec != spec
    # reordered exactly when the result comes out as asked: batch dims first, contracting dims last
    assert reordered == (spec in ("abe,abf->ef", "ne,nv->ev", "nv,ne->ve", "btgrd,bsgd->bgrts"))
    if reordered:
        na, nb = ins.split(",")
        contract = [c for c in na if c in nb and c not in out]
        assert na.endswith("".join(contract)) and out == spec.split("->")[1]
