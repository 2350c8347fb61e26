"""Sharding on 8 fake CPU devices (mesh data=2, fsdp=2, tensor=2): the same numbers as one device,
and every parameter placed where the rules table says. All multi-device checks share one
subprocess (JAX fixes its device count at start-up)."""

from __future__ import annotations

import pytest

from hf_oracle import make_hf_model
from mtr_jax.errors import MtrError
from util import run_with_devices

CODE = r"""
import sys
sys.path.insert(0, "tests")
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
from mtr_jax.config import ModelConfig
from mtr_jax.errors import MtrError
from mtr_jax.model import qwen2
from mtr_jax.model.hf_io import load_hf_params
from mtr_jax.model.presets import build_params
from mtr_jax.parallel import RULES, batch_sharding, make_mesh, param_shardings, shard_params
from mtr_jax.parallel.rules import spec_for
from util import tiny_config

assert jax.device_count() == 8
mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
assert dict(make_mesh({"data": -1, "fsdp": 2, "tensor": 2}).shape)["data"] == 2
assert dict(make_mesh({"data": 1, "fsdp": -1, "tensor": 1}).shape)["fsdp"] == 8
for bad in ({"data": 3, "fsdp": 1, "tensor": 1}, {"data": -1, "fsdp": 3, "tensor": 1}, {"data": -1, "fsdp": -1, "tensor": 1}):
    try:
        make_mesh(bad)
        raise AssertionError(f"no error for {bad}")
    except MtrError as e:
        assert "mesh" in str(e)

cfg = tiny_config(tie_word_embeddings=False)
sh = param_shardings(cfg, mesh)
flat_sh = dict(jax.tree_util.tree_leaves_with_path(sh))
axes = dict(jax.tree_util.tree_leaves_with_path(qwen2.logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple)))
# 1) what the rules table gives (every dim divides here, so it is a plain lookup) ...
for path, names in axes.items():
    want = NamedSharding(mesh, P(*[RULES[n] for n in names]))
    assert flat_sh[path].is_equivalent_to(want, len(names)), (path, flat_sh[path].spec, want.spec)
# 2) ... and the table itself is the intended FSDP x tensor layout
hand = {"embed": P("tensor", "fsdp"), "lm_head": P("fsdp", "tensor"), "final_norm": P(None),
        "q_w": P(None, "fsdp", "tensor"), "k_w": P(None, "fsdp", "tensor"), "q_b": P(None, "tensor"),
        "o_w": P(None, "tensor", "fsdp"), "up_w": P(None, "fsdp", "tensor"), "down_w": P(None, "tensor", "fsdp"),
        "input_norm": P(None, None)}
for path, s in flat_sh.items():
    name = path[-1].key
    if name in hand:
        assert s.is_equivalent_to(NamedSharding(mesh, hand[name]), len(axes[path])), (name, s.spec)
# fallback: a dim (or head count) that does not divide is replicated
assert spec_for(("vocab", "embed"), (255, 64), mesh) == P(None, "fsdp")
one_kv = tiny_config(num_key_value_heads=1)
assert param_shardings(one_kv, mesh)["layers"]["k_w"].spec == P(None, "fsdp", None)
assert batch_sharding(mesh).spec == P(("data", "fsdp"), None)

# forward + one adamw step: sharded == single device
params = qwen2.init_params(cfg, jax.random.key(0), std=0.05)
sharded = shard_params(params, sh)
for (path, a) in jax.tree_util.tree_leaves_with_path(sharded):
    assert a.sharding.is_equivalent_to(flat_sh[path], a.ndim), path
tx = optax.adamw(1e-3, weight_decay=0.01)
ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 16)).astype(np.int32)

def loss_fn(p, ids):
    logits = qwen2.forward(p, cfg, ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean(), logits

def step(p, o, ids):
    (loss, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(p, ids)
    upd, o = tx.update(g, o, p)
    return optax.apply_updates(p, upd), o, loss, logits, g

ref_p, _, ref_loss, ref_logits, ref_g = jax.jit(step)(params, tx.init(params), ids)
opt = jax.jit(tx.init)(sharded)
# scalars (adam's count) come out on one device: replicate them over the mesh
opt_sh = jax.tree_util.tree_map(lambda a: a.sharding if isinstance(a.sharding, NamedSharding) else NamedSharding(mesh, P()), opt)
bs = batch_sharding(mesh)
sstep = jax.jit(step, in_shardings=(sh, opt_sh, bs), out_shardings=(sh, opt_sh, None, bs, sh))
new_p, new_o, loss, logits, g = sstep(sharded, opt, jax.device_put(ids, bs))
assert logits.sharding.is_equivalent_to(bs, 3)
d_logits = float(np.abs(np.asarray(logits) - np.asarray(ref_logits)).max())
d_params = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(new_p), jax.tree.leaves(ref_p)))
moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(new_p), jax.tree.leaves(params)))
for (path, a) in jax.tree_util.tree_leaves_with_path(new_p):
    assert a.sharding.is_equivalent_to(flat_sh[path], a.ndim), path
print("DIFF", d_logits, d_params, moved, abs(float(loss) - float(ref_loss)))
assert d_logits <= 1e-5 and d_params <= 1e-5 and moved > 1e-4

# HF weights land directly in their shards, equal to the single-device load
hp, hcfg = load_hf_params(sys.argv[1], mesh=mesh)
hp1, _ = load_hf_params(sys.argv[1])
hsh = dict(jax.tree_util.tree_leaves_with_path(param_shardings(hcfg, mesh)))
for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(hp), jax.tree.leaves(hp1)):
    assert a.sharding.is_equivalent_to(hsh[path], a.ndim) and np.array_equal(np.asarray(a), np.asarray(b)), path

# random init straight into shards: same values as on one device
bp, bcfg = build_params(ModelConfig(preset="tiny"), mesh, jax.random.key(7))
bp1, _ = build_params(ModelConfig(preset="tiny"), None, jax.random.key(7))
bsh = dict(jax.tree_util.tree_leaves_with_path(param_shardings(bcfg, mesh)))
for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(bp), jax.tree.leaves(bp1)):
    assert a.sharding.is_equivalent_to(bsh[path], a.ndim) and np.array_equal(np.asarray(a), np.asarray(b)), path
print("OK")
"""


def test_sharded_equals_single_device_and_follows_rules(tmp_path):
    make_hf_model(tmp_path / "hf", kv_heads=2, tied=True)
    out = run_with_devices(CODE.replace("sys.argv[1]", repr(str(tmp_path / "hf"))), n_devices=8)
    assert out.strip().endswith("OK"), out
    print(out)  # DIFF logits params moved loss (shown with -s)


def test_mesh_errors_on_one_device():
    from mtr_jax.parallel import make_mesh

    import jax

    n = jax.device_count()
    assert dict(make_mesh(None).shape)["data"] == n
    with pytest.raises(MtrError, match=f"needs {n + 1} devices but {n} are available"):
        make_mesh({"data": n + 1, "fsdp": 1, "tensor": 1})
