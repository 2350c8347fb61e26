"""Checkpoints: bitwise save/restore of the whole training state, retention, restore onto another
mesh shape, a save killed by SIGKILL leaving the previous step restorable, and load_params for
both import-hf output and training-run dirs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

from mtr_jax.config import ModelConfig
from mtr_jax.errors import MtrError
from mtr_jax.model import qwen2
from mtr_jax.train.checkpoint import Checkpointer, load_params
from util import REPO, run_with_devices, tiny_config


def _equal_trees(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb, (ta, tb)
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def _state(seed=0):
    cfg = tiny_config()
    params = qwen2.init_params(cfg, jax.random.key(seed))
    tx = optax.adamw(1e-3)
    opt = tx.init(params)
    grads = jax.tree_util.tree_map(lambda p: 0.01 * p + 1e-3, params)
    upd, opt = tx.update(grads, opt, params)  # non-trivial mu/nu/count
    return cfg, {"params": optax.apply_updates(params, upd), "opt_state": opt, "rng": jax.random.key(seed + 42), "step": 7}


def test_save_restore_bitwise_retention_and_layouts(tmp_path):
    import dataclasses

    cfg, state = _state()
    meta = {"model_config": dataclasses.asdict(cfg), "data": {"epoch": 1, "index": 17}, "note": "x"}
    ck = Checkpointer(tmp_path / "run" / "checkpoints", keep=2)
    for step in (10, 20, 30):
        assert ck.save(step, state, meta={**meta, "at": step})
    ck.wait()
    assert ck.all_steps() == [20, 30] and ck.latest_step() == 30

    target = jax.eval_shape(lambda: state)  # typed PRNG key and optax namedtuples included
    got, got_meta = ck.restore(target={k: v for k, v in target.items() if k != "step"})
    assert got_meta == {**meta, "at": 30}
    assert got["step"] == 7
    _equal_trees(got["params"], state["params"])
    _equal_trees(got["opt_state"], state["opt_state"])  # same namedtuple structure as the target
    assert jax.dtypes.issubdtype(got["rng"].dtype, jax.dtypes.prng_key)
    assert np.array_equal(jax.random.key_data(got["rng"]), jax.random.key_data(state["rng"]))
    # without a target: same values, plain containers
    raw, _ = ck.restore(step=20, items=["opt_state"])
    assert list(raw) == ["opt_state"]
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(raw["opt_state"])[0]), np.asarray(jax.tree.leaves(state["opt_state"])[0]))
    ck.close()

    # load_params: a run dir, its checkpoints/ root and a step dir all work
    for where in (tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "run" / "checkpoints" / "20"):
        p, c = load_params(where)
        assert c == cfg
        _equal_trees(p, state["params"])

    # model.init_from a checkpoint dir -> the same params and config
    from mtr_jax.model.presets import build_params

    p, c = build_params(ModelConfig(init_from=str(tmp_path / "run"), preset="qwen2.5-7b"))
    assert c.hidden_size == cfg.hidden_size
    _equal_trees(p, state["params"])

    with pytest.raises(MtrError, match="no checkpoint found"):
        Checkpointer(tmp_path / "empty").restore()
    with pytest.raises(MtrError, match="not found"):
        load_params(tmp_path / "missing")
    with pytest.raises(MtrError, match="no checkpoint for step 5"):
        Checkpointer(tmp_path / "run" / "checkpoints").restore(step=5)


KILL_CODE = r"""
import asyncio, sys, jax, numpy as np
from orbax.checkpoint._src.path import atomicity
from mtr_jax.train.checkpoint import Checkpointer
big = {"w": np.arange(1 << 18, dtype=np.float32), "b": np.ones(16, np.float32)}
ck = Checkpointer(sys.argv[1], keep=3)
ck.save(1, {"params": big}, meta={"step": 1})
ck.wait()

async def hang(self):  # the step's files are written; freeze just before the atomic rename
    print("MIDSAVE", flush=True)
    await asyncio.sleep(600)

atomicity.AtomicRenameTemporaryPath.finalize = hang
ck.save(2, {"params": {"w": big["w"] * 2, "b": big["b"]}}, meta={"step": 2})
ck.wait()
"""


def test_killed_save_leaves_previous_step_restorable(tmp_path):
    d = tmp_path / "ck"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILL_CODE).replace("sys.argv[1]", repr(str(d)))],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "MIDSAVE", (line, proc.stderr.read() if proc.poll() is not None else "")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert any("tmp" in p.name for p in d.iterdir()), list(d.iterdir())  # killed mid-save, really
    ck = Checkpointer(d)
    assert ck.all_steps() == [1]
    state, meta = ck.restore()
    assert meta == {"step": 1}
    assert np.array_equal(np.asarray(state["params"]["w"]), np.arange(1 << 18, dtype=np.float32))
    # and training can go on: the next save of step 2 succeeds over the leftovers
    ck.save(2, {"params": {"w": np.zeros(3, np.float32)}}, meta={"step": 2})
    ck.wait()
    assert ck.all_steps() == [1, 2]
    ck.close()


MESH_CODE = r"""
import sys
sys.path.insert(0, "tests")
import dataclasses, jax, numpy as np
from mtr_jax.model import qwen2
from mtr_jax.parallel import make_mesh, param_shardings, shard_params
from mtr_jax.train.checkpoint import Checkpointer, load_params
from util import tiny_config
cfg = tiny_config(tie_word_embeddings=False)
params = qwen2.init_params(cfg, jax.random.key(1))
a = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
ck = Checkpointer(sys.argv[1])
ck.save(3, {"params": shard_params(params, param_shardings(cfg, a))}, meta={"model_config": dataclasses.asdict(cfg)})
ck.wait()
for shape in ({"data": 1, "fsdp": 8, "tensor": 1}, {"data": 4, "fsdp": 1, "tensor": 2}, {"data": 1, "fsdp": 2, "tensor": 4}):
    m = make_mesh(shape)
    sh = param_shardings(cfg, m)
    target = jax.tree_util.tree_map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, sh)
    got, _ = ck.restore(target={"params": target})
    lp, _ = load_params(sys.argv[1], mesh=m)
    for x, y, z, s in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(lp), jax.tree.leaves(params), jax.tree.leaves(sh)):
        assert x.sharding.is_equivalent_to(s, x.ndim) and y.sharding.is_equivalent_to(s, y.ndim)
        assert np.array_equal(np.asarray(x), np.asarray(z)) and np.array_equal(np.asarray(y), np.asarray(z))
lp, _ = load_params(sys.argv[1])  # and onto one device
assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(lp))
print("OK")
"""


def test_restore_onto_different_mesh_shapes(tmp_path):
    out = run_with_devices(MESH_CODE.replace("sys.argv[1]", repr(str(tmp_path / "ck"))), n_devices=8)
    assert out.strip().endswith("OK"), out
