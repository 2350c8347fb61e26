"""The peer side of `mtr bench grpo`: google-tunix's GRPOLearner on the same workload as ours.

Runs INSIDE tunix's own virtual environment (tunix pins safetensors<0.8, so it cannot share ours),
as `$MTR_TUNIX_PYTHON tunix_grpo_peer.py SPEC.json`. It must not import mtr_jax. SPEC (written by
`mtr_jax.bench.grpo`) gives the model shape, B, G, max new tokens, the rendered prompt strings, the
token ids we got for them, and the directory of the (same) tokenizer. The last stdout line is one
JSON object: per-iteration wall times after warm-up, the rollout / update split, tunix version.

What runs: tunix.models.qwen2.Qwen2 (random weights, same shape), RLCluster with actor, reference
and rollout colocated on one 1x1 (fsdp, tp) mesh, the vanilla rollout engine (tunix's jitted
sampler), GRPOLearner.train over warmup + iters + 1 batches. An iteration's time is the gap between
the learner pulling batch i and batch i+1 (rollout, reference log-probs, rewards, advantages, the
update, metrics), the span our `GRPOTrainer.step` covers; the extra last batch only closes the
last timed gap.
"""

from __future__ import annotations

import json
import sys
import time


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    import importlib.metadata as md

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from transformers import AutoTokenizer
    from tunix.models.qwen2 import model as qwen2_lib
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    m = spec["model"]
    dtype = jnp.bfloat16 if spec["dtype"] == "bfloat16" else jnp.float32
    tok = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    prompts = spec["prompts"]
    # same prompt ids as ours (the tokenizer and the rendered text are the same)
    ids = [tok.encode(p) for p in prompts]
    ids_match = ids == spec["prompt_ids"]

    # a plain Mesh (Auto axes), as tunix's own tests build it: jax.make_mesh's Explicit axes break
    # tunix's embedding gather
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    cfg = qwen2_lib.ModelConfig(
        num_layers=m["num_hidden_layers"], vocab_size=m["vocab_size"], embed_dim=m["hidden_size"],
        hidden_dim=m["intermediate_size"], num_heads=m["num_attention_heads"], head_dim=m["head_dim"],
        num_kv_heads=m["num_key_value_heads"], rope_theta=int(m["rope_theta"]), norm_eps=m["rms_norm_eps"],
        use_tied_embedding=m["tie_word_embeddings"], dtype=dtype, param_dtype=jnp.float32,
    )
    with mesh:
        actor = qwen2_lib.Qwen2(cfg, rngs=nnx.Rngs(spec["seed"]))
        reference = qwen2_lib.Qwen2(cfg, rngs=nnx.Rngs(spec["seed"])) if spec["beta"] else None
    B, G, N = spec["batch_size"], spec["group_size"], spec["max_new_tokens"]
    warmup, iters = spec["warmup"], spec["iters"]
    max_prompt = 1 << (max(len(i) for i in ids) - 1).bit_length()  # tunix pads prompts to this
    o = spec["optim"]
    tx = optax.chain(
        optax.clip_by_global_norm(o["clip_norm"]),
        optax.adamw(o["lr"], b1=o["b1"], b2=o["b2"], weight_decay=o["weight_decay"]),
    )
    roles = {rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.ROLLOUT: mesh}
    if reference is not None:
        roles[rl_cluster_lib.Role.REFERENCE] = mesh
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh=roles,
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            # mini batch = the whole batch of B prompts: one optimiser step per iteration, as ours
            actor_optimizer=tx, eval_every_n_steps=10**9, max_steps=warmup + iters + 1,
        ),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=N, max_prompt_length=max_prompt, kv_cache_size=max_prompt + N + 8,
            temperature=spec["temperature"], top_p=1.0, top_k=None, eos_tokens=spec["eos_ids"],
        ),
    )
    cluster = rl_cluster_lib.RLCluster(actor=actor, reference=reference, tokenizer=tok, cluster_config=cluster_config)
    algo = grpo_learner.GRPOConfig(
        num_generations=G, num_iterations=1, beta=spec["beta"], epsilon=spec["epsilon"],
        loss_agg_mode="sequence-mean-token-mean", kl_loss_mode="low_var_kl",  # k3, as ours
    )

    def reward(prompts, completions, **kw):  # trivial and as cheap as ours: format + answer tag
        return [float("<answer>" in c) - float("</think>" not in c) for c in completions]

    learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=reward)

    # time stamps: each batch pull, each rollout (+ reference log-probs + rewards), each update
    pulls, cpu, roll, ref, upd, lens = [], [], [], [], [], []
    gen = learner._generate_and_compute_advantage

    def timed_gen(*a, **k):
        t = time.perf_counter()
        ex = gen(*a, **k)
        jax.block_until_ready((ex.completion_ids, ex.ref_per_token_logps, ex.advantages))
        roll.append(time.perf_counter() - t)
        lens.append(float(np.asarray(ex.completion_mask).sum(-1).mean()))
        return ex

    learner._generate_and_compute_advantage = timed_gen
    get_ref = cluster.get_ref_per_token_logps

    def timed_ref(*a, **k):
        t = time.perf_counter()
        out = jax.block_until_ready(get_ref(*a, **k))
        ref.append(time.perf_counter() - t)
        return out

    cluster.get_ref_per_token_logps = timed_ref
    update = cluster.update_actor

    def timed_update(*a, **k):
        t = time.perf_counter()
        out = update(*a, **k)
        jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
        upd.append(time.perf_counter() - t)
        return out

    cluster.update_actor = timed_update

    def batches():
        for i in range(warmup + iters + 1):
            pulls.append(time.perf_counter())
            cpu.append(time.process_time())
            p = [prompts[(i * B + j) % len(prompts)] for j in range(B)]
            yield {"prompts": np.array(p)}

    t0 = time.perf_counter()
    learner.train(batches())
    t_end = time.perf_counter()
    # iteration i spans pull i -> pull i+1; one extra iteration runs so the last timed one ends
    # at a pull too (not at train()'s clean-up)
    its = [b - a for a, b in zip(pulls[:-1], pulls[1:])][: warmup + iters]
    meas = its[warmup:]
    cpu_its = [b - a for a, b in zip(cpu[:-1], cpu[1:])][warmup : warmup + iters]
    rs = roll[warmup : warmup + iters]
    fs = ref[warmup : warmup + iters] if ref else [0.0] * len(rs)
    out = {
        "peer_name": f"google-tunix {md.version('google-tunix')} GRPOLearner",
        "versions": {k: md.version(k) for k in ("google-tunix", "jax", "flax", "optax")},
        "iteration_s": meas, "warmup_s": its[:warmup], "total_s": t_end - t0,
        "iterations_per_s": len(meas) / sum(meas), "cpu_s": cpu_its,
        # split as ours: rollout = generation + rewards/advantages; update = reference log-probs + step
        "rollout_s": float(np.mean(rs) - np.mean(fs)), "update_s": float(np.mean(fs) + np.mean(upd[warmup : warmup + iters])),
        "completion_len": float(np.mean(lens[warmup:])), "max_prompt_length": max_prompt,
        "prompt_ids_match": ids_match, "train_steps": int(cluster.actor_trainer.train_steps),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: tunix_grpo_peer.py SPEC.json", file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1])
