"""Multi-host: 2 processes x 4 fake CPU devices (jax.distributed on localhost), each feeding only its
own rows, give the same SFT step (loss, grad norm, parameters) as 1 process x 8 devices."""

import os
import socket
import subprocess
import sys
import textwrap

from util import REPO

STEP = r'''
import os, sys
from mtr_jax.parallel.distributed import maybe_initialize_distributed
maybe_initialize_distributed()
import jax, jax.numpy as jnp, numpy as np
from mtr_jax.model import qwen2
from mtr_jax.parallel.mesh import make_mesh
from mtr_jax.parallel.rules import param_shardings
from mtr_jax.config import OptimConfig
from mtr_jax.train import losses
from mtr_jax.train.optim import make_optimizer
from mtr_jax.train.step import make_train_step, put_micro_batches, split_micro

mc = qwen2.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
rng = np.random.RandomState(0)
B, T = 16, 32
batch = dict(tokens=rng.randint(0, 128, (B, T)).astype(np.int32),
             loss_mask=(rng.uniform(size=(B, T)) > 0.3).astype(np.int32),
             segment_ids=np.ones((B, T), np.int32), positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)))
# each process holds only its own rows (as grain's shard_index/shard_count gives them)
pc, pi = jax.process_count(), jax.process_index()
local = {k: v[pi * B // pc:(pi + 1) * B // pc] for k, v in batch.items()}
params = jax.jit(qwen2.init_params, static_argnums=0, out_shardings=param_shardings(mc, mesh))(mc, jax.random.PRNGKey(0))
tx, _ = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), 10)
opt = jax.jit(tx.init)(params)

def loss_num(p, mb):
    n, d = losses.sft_loss_num(p, mc, mb)
    return n, {"tokens": d}

step = make_train_step(loss_num, losses.sft_denominator, tx)
p, o, m = step(params, opt, put_micro_batches(split_micro(local, 2), mesh))
checksum = jax.jit(lambda p: sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(p)),
                   out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))(p)
print("RESULT", pc, float(m["loss"]), float(m["grad_norm"]), float(m["tokens"]), float(checksum), flush=True)
'''


def _env(n_dev, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n_dev}")
    env.update(kw)
    return env


def _result(out):
    line = [l for l in out.splitlines() if l.startswith("RESULT")][-1]
    return [float(x) for x in line.split()[1:]]


def test_two_processes_equal_one_process():
    one = subprocess.run([sys.executable, "-c", STEP], cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", STEP], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                                  JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert "RESULT 2" in o, (o, e[-2000:])
        assert p.returncode == 0, e[-3000:]
    r1 = _result(one.stdout)
    for o, _ in outs:
        r2 = _result(o)
        assert r1[0] == 1 and r2[0] == 2
        assert r2[3] == r1[3]  # the same label tokens in the global denominator
        for a, b in zip(r1[1:], r2[1:]):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (r1, r2)
