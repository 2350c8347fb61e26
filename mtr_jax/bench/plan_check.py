"""`mtr plan` against the compiler at the real shape: planned vs XLA's compiled memory.

`python -m mtr_jax.bench.plan_check [--model offline:qwen2.5-coder-0.5b-instruct] [--json]` builds
the programs the trainers run -- the SFT train step (full rows, LM head at label positions), the
GRPO update (each group's prompt once, `share_prompt`) and GRPO's no-grad log-prob forward -- for
the real Qwen2.5-0.5B shape (vocab 151936, 24 layers, bfloat16 compute, float32 master weights,
AdamW), with and without remat, lowers and compiles them for one CPU device from shapes alone (no
weights are read or allocated) and prints, per case, `mtr plan`'s figure next to XLA's
`memory_analysis()` (arguments + temporaries + outputs - aliased). The shapes are the worst case
the plan assumes: every position of an SFT row a label (K = T), GRPO prompts of the plan's prompt
budget and completions filling the rest of `grpo.max_len` (`plan.grpo_shapes`). The plan's coefficients were fitted on
tiny configs (tests/test_plan.py), never on these programs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

CASES = {
    # name: (stage, config overrides). The larger cases make the activations, not the optimizer
    # update, the peak of the remat step, so the remat activation model is what they check.
    "sft 4x1024": ("sft", {"sft.batch_size": 4, "sft.seq_len": 1024}),
    "sft 2x2048": ("sft", {"sft.batch_size": 2, "sft.seq_len": 2048}),
    "sft 8x2048": ("sft", {"sft.batch_size": 8, "sft.seq_len": 2048}),
    "grpo 2x8, max_len 1024": ("grpo", {"grpo.batch_size": 2, "grpo.group_size": 8, "grpo.minibatches": 2,
                                         "grpo.max_len": 1024, "grpo.max_turns": 4, "grpo.max_new_tokens": 128}),
    "grpo 4x8, max_len 2048": ("grpo", {"grpo.batch_size": 4, "grpo.group_size": 8, "grpo.minibatches": 1,
                                         "grpo.max_len": 2048, "grpo.max_turns": 4, "grpo.max_new_tokens": 256,
                                         "grpo.beta": 0.04}),  # beta > 0: the reference log-prob forward runs
}


def _peak(compiled) -> int:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def _cfg(model: str, remat: bool, over: dict):
    from mtr_jax.config import load_config

    base = {"model": {"preset": "qwen2.5-0.5b", "init_from": model, "dtype": "bfloat16", "param_dtype": "float32",
                      "remat": remat, "scan_layers": True},
            "mesh": {"data": -1}, "run": {"accelerator": "cpu-1"}}
    return load_config(None, [f"{k}={v}" for k, v in over.items()], base=base)


def _abstract_state(mcfg, optim, steps: int = 10):
    import jax

    from mtr_jax.model.qwen2 import init_params
    from mtr_jax.train.optim import make_optimizer

    tx, _ = make_optimizer(optim, steps)
    params = jax.eval_shape(lambda: init_params(mcfg, jax.random.key(0)))
    return tx, params, jax.eval_shape(tx.init, params)


def measure_sft(cfg, mcfg) -> int:
    import jax
    import jax.numpy as jnp

    from mtr_jax.train import losses
    from mtr_jax.train.step import make_train_step

    s = cfg.sft
    tx, params, opt = _abstract_state(mcfg, s.optim)
    A, R, T = s.grad_accum, s.batch_size // s.grad_accum, s.seq_len
    i32 = lambda *sh: jax.ShapeDtypeStruct(sh, jnp.int32)  # noqa: E731
    batch = {k: i32(A, R, T) for k in ("tokens", "loss_mask", "segment_ids", "positions")}
    batch["label_idx"] = i32(A, R, T - 1)  # label_index's bucket when every position is a label
    batch["label_w"] = jax.ShapeDtypeStruct((A, R, T - 1), jnp.float32)

    def loss_num(p, mb):
        num, den = losses.sft_loss_num(p, mcfg, mb)
        return num, {"tokens": den}

    step = make_train_step(loss_num, losses.sft_denominator, tx)
    return _peak(step.lower(params, opt, batch).compile())


def measure_grpo(cfg, mcfg) -> tuple[int, int]:
    """(update step, log-prob forward) of one minibatch: in completion coordinates when the plan
    assumes the shared-prompt layout (`grpo.share_prompt`), else on full rows of `max_len`."""
    import jax
    import jax.numpy as jnp

    from mtr_jax.model.qwen2 import init_params
    from mtr_jax.plan import _bucket, grpo_shapes
    from mtr_jax.train import losses
    from mtr_jax.train.grpo import make_grpo_loss, make_logprob_fn, make_shared_logprob_fn
    from mtr_jax.train.step import make_train_step

    g = cfg.grpo
    tx, params, opt = _abstract_state(mcfg, g.optim)
    R = g.batch_size * g.group_size // g.minibatches
    i32 = lambda *sh: jax.ShapeDtypeStruct(sh, jnp.int32)  # noqa: E731
    f32 = lambda *sh: jax.ShapeDtypeStruct(sh, jnp.float32)  # noqa: E731
    if g.share_prompt and R % g.group_size == 0:
        P, C = grpo_shapes(g)
        Q = R // g.group_size
        mb = {"prompts": i32(1, Q, P), "prompt_lens": i32(1, Q), "completions": i32(1, R, C), "mask": f32(1, R, C),
              "sampler_logp": f32(1, R, C), "episode": f32(1, R), "old_logp": f32(1, R, C), "ref_logp": f32(1, R, C),
              "adv": f32(1, R)}
        fwd = make_shared_logprob_fn(mcfg, g.temperature).lower(params, i32(Q, P), i32(Q), i32(R, C))
    else:
        T = _bucket(g.max_len)
        mb = {"tokens": i32(1, R, T), "segment_ids": i32(1, R, T), "positions": i32(1, R, T), "mask": f32(1, R, T),
              "old_logp": f32(1, R, T - 1), "ref_logp": f32(1, R, T - 1), "adv": f32(1, R), "sampler_logp": f32(1, R, T)}
        fwd = make_logprob_fn(mcfg, g.temperature).lower(params, i32(R, T), i32(R, T), i32(R, T))
    step = make_train_step(make_grpo_loss(mcfg, g), lambda b: losses.grpo_denominator_jnp(b, g.loss_agg), tx)
    return _peak(step.lower(params, opt, mb).compile()), _peak(fwd.compile())


def run(model: str, only: str = "") -> list[dict]:
    from mtr_jax.plan import estimate, model_config

    rows = []
    for name, (stage, over) in CASES.items():
        if only and only not in name:
            continue
        for remat in (False, True):
            cfg = _cfg(model, remat, over)
            mcfg = model_config(cfg)
            est = estimate(cfg, mcfg, (1, 1, 1), stage)
            t0 = time.perf_counter()
            if stage == "sft":
                pairs = [("train step", est["peak"], measure_sft(cfg, mcfg))]
            else:
                upd, fwd = measure_grpo(cfg, mcfg)
                pairs = [("update step", est["params"] + est["optimizer"] + est["train_step"], upd)]
                if not remat and est["logprob_forward"]:  # no-grad: remat changes nothing; on-policy runs skip it
                    pairs.append(("log-prob forward", est["params"] + est["logprob_forward"], fwd))
            for prog, planned, measured in pairs:
                rows.append({"case": name, "remat": remat, "program": prog, "planned": planned, "measured": measured,
                             "ratio": planned / measured, "compile_s": round(time.perf_counter() - t0, 1)})
                print(f"{name:24s} remat={str(remat):5s} {prog:16s} planned {planned / 2**30:7.3f} GiB  "
                      f"XLA {measured / 2**30:7.3f} GiB  planned/XLA {planned / measured:5.2f}", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="offline:qwen2.5-coder-0.5b-instruct",
                    help="init_from whose shape is planned (its config only is read)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    a = ap.parse_args(argv)
    rows = run(a.model, a.only)
    if a.json:
        print(json.dumps(rows))
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"worst |planned/XLA - 1| = {worst:.1%} over {len(rows)} programs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
