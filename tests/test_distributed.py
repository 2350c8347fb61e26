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


GRPO_EVAL = r'''
import json, os, sys
from mtr_jax.parallel.distributed import maybe_initialize_distributed
maybe_initialize_distributed()
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from mtr_jax.config import load_config, ToolsConfig
from mtr_jax.data.demo_tokenizer import demo_tokenizer_for_world
from mtr_jax.data.synthetic import make_world, split_world
from mtr_jax.eval import evaluate_records, summarize
from mtr_jax.model import qwen2
from mtr_jax.parallel import hosts
from mtr_jax.parallel.mesh import make_mesh
from mtr_jax.parallel.rules import param_shardings
from mtr_jax.rollout.episodes import run_episodes
from mtr_jax.sampling import Sampler, SamplingParams
from mtr_jax.tools.toolactor import ToolActor
from mtr_jax.tools.toolmaker import ToolMaker
from mtr_jax.traces import parse as trace_parse
from mtr_jax.train.grpo import GRPOTrainer

# A random tiny model writes no tool calls. Read its turns as calls (a search for the turn's first
# words) or, for a third of them, as answers: each process's ToolActor answers real calls, tool
# responses of different lengths are appended, and rows end at different turns on the two
# processes, as in a real rollout (fault injection into the parser, not into what is tested).
def parse_turn(text):
    words = "".join(c for c in text if c.isalnum() or c == " ").split()[:3] or ["x"]
    if len(text) % 3 == 0:
        return trace_parse.ParsedTurn(kind="answer", text=text, answer=" ".join(words))
    return trace_parse.ParsedTurn(kind="tool_call", text=text, calls=[{"name": "search", "arguments": {"query": " ".join(words)}}])
trace_parse.parse_turn = parse_turn

run_dir = sys.argv[1]
pc, pi = jax.process_count(), jax.process_index()
Q = 4 // pc  # questions per process (grpo.batch_size): the global step is 4 questions x 2 samples either way
w = make_world(seed=0)
train, held = split_world(w, n_train=8, n_heldout=6, seed=0)
tok = demo_tokenizer_for_world(w)
mc = qwen2.Qwen2Config(vocab_size=(len(tok) + 63) // 64 * 64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
actor = ToolActor.from_config(ToolsConfig(), os.path.join(run_dir, f"cache.p{pi}.sqlite"))
tm = ToolMaker("template")
rep = NamedSharding(mesh, P())
checksum = jax.jit(lambda p: sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(p)),
                   out_shardings=rep)
out = {"pc": pc}
for share in ("true", "false"):  # the shared-prompt update and the full-row one
    cfg = load_config(None, [f"grpo.batch_size={Q}", "grpo.group_size=2", "grpo.max_turns=3", "grpo.max_new_tokens=8",
                             "grpo.max_len=768", "grpo.beta=0.05", "grpo.mu=2", "grpo.minibatches=1",
                             "grpo.optim.lr=1e-3", f"grpo.share_prompt={share}", f"run.out_dir={run_dir}"])
    params = jax.jit(qwen2.init_params, static_argnums=0, out_shardings=param_shardings(mc, mesh))(mc, jax.random.PRNGKey(0))
    tr = GRPOTrainer(cfg, mc, params, tok, train, actor, tm, mesh=mesh)
    tr.sampler.eos_ids = tuple(range(7, mc.vocab_size, 11))  # turns end (with an "eos") after a few tokens
    # a reward the random model varies on: a function of each episode's tokens, computed by its process
    tr.score = lambda eps: [{"reward": (sum(e.token_ids) % 13) / 13.0, "em": 0.0,
                             "ended": float(e.end_reason == "answer")} for e in eps]
    met, eps, _ = tr.step(train[:4][pi * Q:(pi + 1) * Q], jax.random.PRNGKey(1))
    out[share] = {"metrics": {k: v for k, v in met.items() if isinstance(v, float) and not k.endswith("_s")},
                  "checksum": float(checksum(tr.params)),
                  "tokens": [int(t) for t in hosts.gather_rows(np.asarray([sum(e.token_ids) for e in eps], np.int64))]}

# eval: greedy turns of a random model repeat one token, so every token ends a turn
sampler = Sampler(mc, cache_len=768, eos_ids=range(mc.vocab_size), mesh=mesh)
def rollout(recs):
    return run_episodes(sampler, tr.policy(), tok, recs, tm.make_batch(recs), actor, group_size=1,
                        sampling=SamplingParams(greedy=True), max_turns=3, max_new_tokens=8, max_len=768,
                        key=jax.random.PRNGKey(0))
rows = evaluate_records(rollout, held, 4 // pc, os.path.join(run_dir, "eval.jsonl"), progress=False)
out["eval"] = summarize(rows)
out["eval_rows"] = [{k: r[k] for k in ("id", "prediction", "turns", "tool_calls", "end_reason")} | {"trace": r["trace"]["messages"]}
                    for r in rows]
out["written"] = sum(1 for _ in open(os.path.join(run_dir, "eval.jsonl")))
print("RESULT " + json.dumps(out), flush=True)
'''


def test_grpo_step_and_eval_on_two_processes_equal_one_process(tmp_path):
    """A GRPO step (shared-prompt and full-row update) and an eval pass on 2 processes x 4 devices,
    each process rolling out ITS questions with its own ToolActor, give the same episodes, loss,
    metrics and parameters as 1 process x 8 devices; eval rows are gathered and written once."""
    import json

    def result(out):
        line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
        return json.loads(line[len("RESULT "):])

    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = subprocess.run([sys.executable, "-c", GRPO_EVAL, str(tmp_path / "one")], cwd=REPO, env=_env(8),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", GRPO_EVAL, str(tmp_path / "two")], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0 and "RESULT" in o, e[-3000:]
    want = result(one.stdout)
    assert want["pc"] == 1
    for share in ("true", "false"):
        w = want[share]
        assert w["metrics"]["tool_calls"] > 0 and w["metrics"]["grad_norm"] > 0 and w["metrics"]["kept_episodes"] == 8
        assert w["metrics"]["shared_prompt"] == float(share == "true")
    assert want["eval"]["avg_tool_calls"] > 0 and want["eval"]["n"] == 6 and want["written"] == 6
    for rank, (o, _) in enumerate(outs):
        got = result(o)
        assert got["pc"] == 2
        for share in ("true", "false"):
            w, g = want[share], got[share]
            assert g["tokens"] == w["tokens"]  # the same episodes, row for row
            assert set(g["metrics"]) == set(w["metrics"])
            for k, v in w["metrics"].items():
                assert abs(g["metrics"][k] - v) <= 1e-5 * max(1.0, abs(v)), (share, k, g["metrics"][k], v)
            assert abs(g["checksum"] - w["checksum"]) <= 1e-5 * w["checksum"], (share, g["checksum"], w["checksum"])
        assert got["eval"] == want["eval"] and got["eval_rows"] == want["eval_rows"]
        if rank == 0:  # process 0 wrote each row once (process 1 may read the file before the last batch lands)
            assert got["written"] == 6

