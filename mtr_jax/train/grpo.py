"""Stage 2, GRPO: grouped multi-turn rollouts against simulated tools, composite trace reward,
group-relative advantages, clipped policy-gradient updates (formulas in `train/losses.py`).

One step: B questions -> B x G episodes (jitted sampler, tool turns answered by the ToolActor and
appended through the sampler's continuation) -> composite reward per episode -> advantages ->
`mu` passes over `minibatches` optimiser steps. Old-policy log-probs are recomputed by the
trainer's own forward (same temperature, same masking) and their gap to the sampler's log-probs
is logged every step (`logprob_gap`): a silent mismatch is how GRPO collapses.

Several processes (a pod slice): each process rolls out its own questions (`grpo.batch_size` per
process), its ToolActor answers its calls, and rewards and advantages are computed where the
groups live (a group never spans processes). The update runs on the global batch; its shapes are
agreed across processes, and the logged rollout metrics are gathered over all episodes.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtr_jax.config import Config
from mtr_jax import paths
from mtr_jax.errors import MtrError
from mtr_jax.model import lora, quant
from mtr_jax.parallel import hosts
from mtr_jax.train import losses
from mtr_jax.train.metrics import MetricsLogger
from mtr_jax.train.optim import make_optimizer
from mtr_jax.train.step import make_train_step, put_micro_batches, split_micro


def has_void_turn(ep) -> bool:
    """SimpleTIR's void turn: an assistant turn that is neither a complete tool call nor an answer
    (cut at the turn's token budget, or unparseable)."""
    from mtr_jax.traces import parse as trace_parse

    if ep.end_reason == "length":
        return True
    return any(trace_parse.parse_turn(t).kind not in ("tool_call", "answer") for t in ep.turn_texts)


def episodes_to_batch(eps, rows: int, length: int, pad_id: int):
    """Pad episodes into [rows, length] arrays. mask/logp are on the LABEL side (index t = token t)."""
    tokens = np.full((rows, length), pad_id, np.int32)
    seg = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), np.float32)
    slogp = np.zeros((rows, length), np.float32)
    for i, e in enumerate(eps):
        n = len(e.token_ids)
        tokens[i, :n] = e.token_ids
        seg[i, :n] = 1
        mask[i, :n] = e.loss_mask
        slogp[i, :n] = e.logprobs
    pos = np.tile(np.arange(length, dtype=np.int32), (rows, 1))
    return {"tokens": tokens, "segment_ids": seg, "positions": pos, "mask": mask, "sampler_logp": slogp}


def episodes_to_shared_batch(eps, groups: int, group_size: int, pad_id: int, max_len: int, shape=None):
    """Completion coordinates for the shared-prompt update: each group's prompt once and its G
    completions (everything after the prompt: sampled turns AND appended tool responses).
    prompts [groups, P], prompt_lens [groups], completions / mask / sampler_logp [groups*G, C]
    (index j = completion token j), episode [groups*G] (1 = a real episode; padding groups are
    0). P is rounded up to a multiple of 128 and C to a power of two >= 64: a few shapes over a
    run (each new one is a compile), little padding; `shape=(P, C)` sets them (processes agree on
    one). None when a group's episodes do not share their prompt (then the full-row update is used)."""
    n = len(eps)
    if n % group_size:
        return None
    spans = []
    for e in eps:
        p = e.prompt_len if e.prompt_len < max_len else 1  # a prompt that never ran: nothing to score
        spans.append((e.token_ids[:p], e.token_ids[p:] if e.prompt_len < max_len else []))
    for q in range(n // group_size):
        first = spans[q * group_size][0]
        if any(spans[q * group_size + i][0] != first for i in range(1, group_size)):
            return None
    if shape is None:
        P = max(-(-max((len(pr) for pr, _ in spans), default=1) // 128) * 128, 128)
        C = max(1 << (max((len(c) for _, c in spans), default=1) - 1).bit_length(), 64)
    else:
        P, C = shape
    rows = groups * group_size
    prompts = np.full((groups, P), pad_id, np.int32)
    lens = np.ones(groups, np.int32)
    comp = np.full((rows, C), pad_id, np.int32)
    mask = np.zeros((rows, C), np.float32)
    slogp = np.zeros((rows, C), np.float32)
    episode = np.zeros(rows, np.float32)
    for i, (e, (pr, c)) in enumerate(zip(eps, spans)):
        if i % group_size == 0:
            prompts[i // group_size, :len(pr)] = pr
            lens[i // group_size] = len(pr)
        k, p = len(c), len(pr)
        comp[i, :k] = c
        if e.prompt_len < max_len:
            mask[i, :k] = e.loss_mask[p:]
            slogp[i, :k] = e.logprobs[p:]
        episode[i] = 1.0
    return {"prompts": prompts, "prompt_lens": lens, "completions": comp, "mask": mask, "sampler_logp": slogp,
            "episode": episode}


def make_logprob_fn(model_cfg, temperature: float):
    @jax.jit
    def fn(params, tokens, seg, pos):
        logp, ent = losses.token_logprobs(params, model_cfg, tokens, seg, pos, temperature)
        return logp, ent

    return fn


def make_shared_logprob_fn(model_cfg, temperature: float):
    @jax.jit
    def fn(params, prompts, prompt_lens, completions):
        return losses.completion_logprobs(params, model_cfg, prompts, prompt_lens, completions, temperature)

    return fn


def make_grpo_loss(model_cfg, g, on_policy: bool = False):
    """on_policy (mu = 1, one minibatch): the old policy IS the current one, so logp_old =
    stop_gradient(logp) (ratio 1, the gradient of the clipped objective is A * grad logp) and the
    separate old-policy forward is skipped; the sampler/trainer gap is measured here instead."""

    def loss_num(p, mb):
        if "prompts" in mb:  # completion coordinates, each group's prompt run once
            logp, ent = losses.completion_logprobs(p, model_cfg, mb["prompts"], mb["prompt_lens"], mb["completions"],
                                                   g.temperature)
            m, sampler_logp = mb["mask"], mb["sampler_logp"]
        else:
            logp, ent = losses.token_logprobs(p, model_cfg, mb["tokens"], mb["segment_ids"], mb["positions"],
                                              g.temperature)
            m, sampler_logp = mb["mask"][:, 1:], mb["sampler_logp"][:, 1:]
        old = jax.lax.stop_gradient(logp) if on_policy else mb["old_logp"]
        num, st = losses.grpo_loss_num(
            logp, old, mb["ref_logp"], mb["adv"], m, eps_low=g.epsilon_low, eps_high=g.epsilon_high,
            beta=g.beta, loss_agg=g.loss_agg, max_len=g.max_new_tokens * g.max_turns,
        )
        st["entropy_sum"] = jnp.sum(ent * m)
        st["gap_sum"] = jnp.sum(jnp.abs(jax.lax.stop_gradient(logp) - sampler_logp) * m)
        return num, st

    return loss_num


class GRPOTrainer:
    """Holds what one GRPO run needs; `step()` does one rollout + update iteration."""

    def __init__(self, cfg: Config, model_cfg, params, tokenizer, records, actor, toolmaker, *, mesh=None,
                 ref_params=None, total_steps=None):
        from mtr_jax.sampling import Sampler, SamplingParams

        g = cfg.grpo
        if g.loss_agg not in losses.LOSS_AGGS:
            raise MtrError(f"grpo.loss_agg={g.loss_agg!r}: expected one of {', '.join(losses.LOSS_AGGS)}")
        if (g.batch_size * g.group_size) % g.minibatches:
            raise MtrError(f"grpo.minibatches={g.minibatches} does not divide B*G={g.batch_size * g.group_size}")
        quant.validate(g.rollout_quant, "grpo.rollout_quant")
        if g.grad_accum < 1 or (g.batch_size // g.minibatches) % g.grad_accum:
            raise MtrError(f"grpo.grad_accum={g.grad_accum} must divide the questions per minibatch "
                           f"({g.batch_size // g.minibatches}): each micro-batch holds whole groups")
        if g.group_size < 2:
            raise MtrError("grpo.group_size must be >= 2 (advantages are relative to the group)")
        if not records:
            raise MtrError("grpo: no questions to train on")
        self.cfg, self.g, self.model_cfg, self.tok = cfg, g, model_cfg, tokenizer
        self.records, self.actor, self.toolmaker, self.mesh = records, actor, toolmaker, mesh
        self.frozen = ()
        self.token_ids = lora.resolve_tokens(cfg.lora, tokenizer) if cfg.lora.enabled else ()
        if cfg.lora.enabled:  # train adapters only; the frozen base is also the KL reference
            model_cfg, base, params = lora.prepare(cfg.lora, model_cfg, params, mesh, jax.random.key(cfg.run.seed),
                                                   token_ids=self.token_ids)
            self.frozen, self.model_cfg = (base,), model_cfg
        self.params = params
        self.ref_params = ref_params if g.beta else None
        if g.beta and ref_params is None and not self.frozen:  # full fine-tuning keeps a copy of the start
            self.ref_params = jax.tree_util.tree_map(lambda x: x.copy(), params)
        self.tx, self.sched = make_optimizer(g.optim, total_steps or g.steps)
        self.opt_state = jax.jit(self.tx.init)(params)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        # an int8 rollout copy runs under its own config (untied head, W8A8 for int8-dynamic)
        self.sampler = Sampler(quant.sampling_config(model_cfg, g.rollout_quant), cache_len=g.max_len, eos_ids=[e for e in eos if e is not None], pad_id=self.pad_id,
                               mesh=mesh)
        self.sampling = SamplingParams(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
        self.logprob_fn = make_logprob_fn(model_cfg, g.temperature)
        self.shared_logprob_fn = make_shared_logprob_fn(model_cfg, g.temperature)
        # mu = 1 and one minibatch: on-policy, no separate old-policy forward (as TRL and tunix do)
        self.on_policy = g.mu == 1 and g.minibatches == 1
        inner = make_grpo_loss(model_cfg, g, self.on_policy)
        self.dropout = cfg.lora.enabled and cfg.lora.dropout > 0
        L = model_cfg.num_hidden_layers

        def loss(p, mb, *base):
            full = lora.with_adapters(base[0], p, self.token_ids, patch_rows=True) if base else p
            if self.dropout:
                full = lora.with_dropout(full, mb["dropout_key"], L)
            return inner(full, mb)

        self.step_fn = make_train_step(loss, lambda b: losses.grpo_denominator_jnp(b, g.loss_agg), self.tx)
        self.tools_cache: dict[str, list] = {}
        self._step_key = jax.random.PRNGKey(0)  # this step's rollout key (LoRA dropout masks derive from it)

    def policy(self):
        """The params the model runs: the trained ones, or base + adapters with LoRA."""
        return lora.with_adapters(self.frozen[0], self.params, self.token_ids) if self.frozen else self.params

    def reference(self):
        """KL reference: with LoRA the base itself (no second copy of the weights)."""
        return self.frozen[0] if self.frozen else self.ref_params

    def tools_for(self, rec):
        if rec.id not in self.tools_cache:
            self.tools_cache[rec.id] = self.toolmaker.make(rec)
        return self.tools_cache[rec.id]

    def rollout(self, recs, key, group_size, sampling=None, params=None):
        from mtr_jax.rollout.episodes import run_episodes

        g = self.g
        params = self.policy() if params is None else params
        params, _ = quant.for_sampling(params, self.model_cfg, g.rollout_quant)  # once per rollout
        return run_episodes(
            self.sampler, params, self.tok, recs, [self.tools_for(r) for r in recs],
            self.actor, group_size=group_size, sampling=sampling or self.sampling, max_turns=g.max_turns,
            max_new_tokens=g.max_new_tokens, max_len=g.max_len, key=key,
        )

    def score(self, eps):
        from mtr_jax.rewards import RewardWeights, trace_reward

        w = RewardWeights.from_config(self.g)
        budget = max(1, self.g.max_turns * self.g.max_new_tokens)  # the most an episode can generate
        return [trace_reward(e.turn_texts, e.observations, e.calls_valid, e.record.golds, w,
                             length=sum(e.loss_mask) / budget) for e in eps]

    def step(self, recs, key):
        g = self.g
        self._step_key = key
        t0 = time.perf_counter()
        eps = self.rollout(recs, key, g.group_size)
        scores = self.score(eps)
        t_roll = time.perf_counter() - t0
        rewards = np.array([s["reward"] for s in scores], np.float32)
        valid = ~np.array([has_void_turn(e) for e in eps], bool) if g.drop_void_turns else np.ones(len(eps), bool)
        adv = losses.group_advantages(rewards, g.group_size, scale_std=g.scale_std, valid=valid)
        keep = np.ones(len(eps), bool)  # whole groups: the update shares each group's prompt
        if not valid.all():  # a void episode stays in its group's rows with no loss tokens
            eps_upd = [e if ok else dataclasses.replace(e, loss_mask=[0] * len(e.loss_mask)) for e, ok in zip(eps, valid)]
        else:
            eps_upd = eps
        if g.drop_equal_groups:  # groups whose valid episodes all scored the same carry no advantage
            v = valid.reshape(-1, g.group_size)
            grp = rewards.reshape(-1, g.group_size)
            spread = np.where(v, grp, -np.inf).max(axis=1) > np.where(v, grp, np.inf).min(axis=1)
            keep &= np.repeat(spread, g.group_size)
        metrics = self._rollout_metrics(eps, scores, rewards)
        if g.drop_void_turns:
            metrics["void_episodes"] = hosts.total((~valid).sum())
        if getattr(self.actor, "sees_answer", False):  # the training-time leak is on: say how often
            metrics["tools/answer_shown"] = hosts.total(self.actor.counters["answer_shown"])
        t1 = time.perf_counter()
        # every process joins the update if any kept a group (one with none feeds padding rows)
        if hosts.any_(keep.any()):
            upd = self._update([e for e, k in zip(eps_upd, keep) if k], adv[keep])
        else:
            upd = {"skipped_groups": 1.0}
        metrics.update(upd)
        metrics["rollout_s"], metrics["update_s"] = t_roll, time.perf_counter() - t1
        metrics["kept_episodes"] = hosts.total(keep.sum())
        return metrics, eps, scores

    def _update(self, eps, adv):
        g = self.g
        n = len(eps)
        mbs = g.minibatches
        groups = self._update_groups(n)
        rows = groups * g.group_size
        shared = None
        if g.share_prompt and (rows // mbs) % g.group_size == 0:  # minibatches hold whole groups
            shared = episodes_to_shared_batch(eps, groups, g.group_size, self.pad_id, g.max_len)
            if hosts.multi():  # one layout and one shape on every process
                ok = hosts.all_(shared is not None)
                shape = (shared["prompts"].shape[1], shared["completions"].shape[1]) if shared is not None else (0, 0)
                shape = hosts.agree_max(*shape)
                shared = episodes_to_shared_batch(eps, groups, g.group_size, self.pad_id, g.max_len,
                                                  shape=shape) if ok else None
        if shared is not None:
            b = shared
            lp = lambda params: self._shared_logprobs(params, b, mbs)
            n_gen = max(hosts.total(b["mask"].sum()), 1.0)
            sampler_logp = b["sampler_logp"]
            data = {k: b[k] for k in ("prompts", "prompt_lens", "completions", "mask", "sampler_logp", "episode")}
            zeros = np.zeros(b["mask"].shape, np.float32)
            gen_mask = b["mask"]
        else:
            b = self._full_rows(eps, rows)
            lp = lambda params: self._logprobs(params, b, mbs)
            n_gen = max(hosts.total(b["mask"][:, 1:].sum()), 1.0)
            sampler_logp = b["sampler_logp"][:, 1:]
            data = {k: b[k] for k in ("tokens", "segment_ids", "positions", "mask", "sampler_logp")}
            zeros = np.zeros((rows, b["tokens"].shape[1] - 1), np.float32)
            gen_mask = b["mask"][:, 1:]
        adv_full = np.zeros(rows, np.float32)
        adv_full[:n] = adv
        old_logp = zeros if self.on_policy else lp(self.policy())
        ref_logp = lp(self.reference()) if g.beta else zeros
        data.update(old_logp=old_logp, ref_logp=ref_logp, adv=adv_full)
        gap = None if self.on_policy else hosts.total(np.abs((old_logp - sampler_logp) * gen_mask).sum()) / n_gen
        per = rows // mbs
        tot = {"loss": 0.0, "grad_norm": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "skipped": 0.0}
        count = 0
        for _ in range(g.mu):
            for j in range(mbs):
                sl = slice(j * per, (j + 1) * per)
                gsl = slice(j * per // g.group_size, (j + 1) * per // g.group_size)
                mb = {k: v[gsl] if k in ("prompts", "prompt_lens") else v[sl] for k, v in data.items()}
                accum = math.gcd(g.grad_accum, per // g.group_size)  # drop_equal_groups may keep fewer groups
                mb = split_micro(mb, accum)
                if self.dropout:  # from the step's (checkpointed) key: a resumed run draws the same masks
                    mb["dropout_key"] = np.stack([lora.dropout_key_from(self._step_key, count * accum + a)
                                                  for a in range(accum)])
                mb = put_micro_batches(mb, self.mesh)
                self.params, self.opt_state, met = self.step_fn(self.params, self.opt_state, mb, *self.frozen)
                met = jax.device_get(met)
                toks = max(float(met["tokens"]), 1.0)
                tot["loss"] += float(met["loss"])
                tot["grad_norm"] += float(met["grad_norm"])
                tot["kl"] += float(met["kl_sum"]) / toks
                tot["clip_frac"] += float(met["clip_sum"]) / toks
                tot["entropy"] += float(met["entropy_sum"]) / toks
                tot["skipped"] += float(met["skipped"])
                if self.on_policy:  # one step: its params are the rollout policy
                    gap = float(met["gap_sum"]) / n_gen
                count += 1
        out = {k: v / count for k, v in tot.items()}
        out["skipped"] = tot["skipped"]
        out["logprob_gap"] = gap
        out["shared_prompt"] = float(shared is not None)
        return out

    def _update_groups(self, n: int) -> int:
        """Groups the update pads to. With `drop_equal_groups` only the groups that carry an
        advantage are kept (DAPO's dynamic sampling): pad them to a power of two (a few shapes,
        so few compiles), not to batch_size, so the update costs what the kept groups cost.
        Padding rows have no tokens and no episode, so the loss and gradient are the same either
        way. Several minibatches (their split would change), a mesh or several processes (rows
        split over devices): the row layout stays fixed."""
        g = self.g
        if not g.drop_equal_groups or g.minibatches > 1 or self.mesh is not None or hosts.multi():
            return g.batch_size
        kept = max(-(-n // g.group_size), 1)
        return min(1 << (kept - 1).bit_length(), g.batch_size)

    def _full_rows(self, eps, rows):
        g = self.g
        # rows padded to B*G and length to a multiple of 128 (capped at max_len): a handful of
        # shapes whatever the episodes, so no recompiles, and little padding
        (longest,) = hosts.agree_max(max((len(e.token_ids) for e in eps), default=1))
        length = min(-(-longest // 128) * 128, max(g.max_len, 128))
        return episodes_to_batch(eps, rows, length, self.pad_id)

    def _logprobs(self, params, b, chunks):
        """Teacher-forced log-probs, `chunks` rows groups at a time (the [rows, T, vocab] logits
        of a whole batch would be the largest buffer of a GRPO step)."""
        per = b["tokens"].shape[0] // chunks
        out = [self._host(self.logprob_fn(params, *(self._rows(b[k][j * per:(j + 1) * per])
                                                    for k in ("tokens", "segment_ids", "positions")))[0])
               for j in range(chunks)]
        return np.concatenate(out, axis=0)

    def _rows(self, x):
        """Host rows -> a jit argument: as they are on one process; several processes: this
        process's rows of a global array split over the data axes."""
        if not hosts.multi():
            return x
        from mtr_jax.parallel.rules import batch_sharding

        spec = batch_sharding(self.mesh, 1).spec[0]
        return hosts.to_global(x, self.mesh, spec if isinstance(spec, tuple) else (spec,) if spec else ())

    def _host(self, x) -> np.ndarray:
        if not hosts.multi():
            return np.asarray(x)
        from mtr_jax.parallel.rules import batch_sharding

        spec = batch_sharding(self.mesh, 1).spec[0]
        return hosts.to_local(x, self.mesh, spec if isinstance(spec, tuple) else (spec,) if spec else ())

    def _shared_logprobs(self, params, b, chunks):
        """`_logprobs` in completion coordinates, `chunks` runs of whole groups."""
        gq = b["prompts"].shape[0] // chunks
        per = gq * self.g.group_size
        out = [self._host(self.shared_logprob_fn(params, self._rows(b["prompts"][j * gq:(j + 1) * gq]),
                                                 self._rows(b["prompt_lens"][j * gq:(j + 1) * gq]),
                                                 self._rows(b["completions"][j * per:(j + 1) * per]))[0]) for j in range(chunks)]
        return np.concatenate(out, axis=0)

    @staticmethod
    def _rollout_metrics(eps, scores, rewards):
        """Means over every episode of the step, on all processes (one column per metric, the
        processes' rows gathered; a non-numeric score value is NaN and left out of its mean)."""
        num = (int, float, bool, np.floating, np.integer)
        keys = [k for k in scores[0] if k != "reward"]  # one reward function: the same keys everywhere
        cols = [rewards.astype(np.float64)]
        cols += [[float(s[k]) if isinstance(s.get(k), num) else np.nan for s in scores] for k in keys]
        cols += [[sum(e.loss_mask) for e in eps], [e.counters["turns"] for e in eps],
                 [e.counters["tool_calls"] for e in eps], [e.counters["invalid_calls"] for e in eps]]
        m = hosts.gather_rows(np.stack([np.asarray(c, np.float64) for c in cols], axis=1))
        met = {"reward": float(m[:, 0].mean()), "reward_std": float(m[:, 0].std())}
        for j, k in enumerate(keys, start=1):
            if not np.isnan(m[:, j]).all():
                met[f"reward/{k}"] = float(np.nanmean(m[:, j]))
        if "em" in keys:
            met["em"] = float(np.mean(m[:, 1 + keys.index("em")]))
        resp, turns, calls, invalid = m[:, -4], m[:, -3], m[:, -2], m[:, -1]
        met["response_len"], met["turns"], met["tool_calls"] = float(resp.mean()), float(turns.mean()), float(calls.mean())
        met["invalid_call_rate"] = float(invalid.sum() / max(calls.sum(), 1))
        return met


def train_grpo(cfg: Config, model_cfg, params, tokenizer, records, actor, toolmaker, run_dir, *, mesh=None,
               resume=False, progress=True, stop_after=None):
    """The GRPO loop with checkpoints, metrics and resume; returns the final params."""
    from mtr_jax.data.pipeline import question_batches
    from mtr_jax.train.checkpoint import Checkpointer
    from mtr_jax.train.sft import _progress, checkpoint_meta

    g = cfg.grpo
    tr = GRPOTrainer(cfg, model_cfg, params, tokenizer, records, actor, toolmaker, mesh=mesh)
    it = question_batches(records, batch_size=g.batch_size, seed=cfg.run.seed,
                          shard_index=jax.process_index(), shard_count=jax.process_count())
    ckpt = Checkpointer(paths.join(run_dir, "checkpoints"), keep=cfg.run.keep_checkpoints)
    key = jax.random.PRNGKey(cfg.run.seed)
    start = 0
    if resume:
        latest = ckpt.latest_step()
        if latest is None:
            raise MtrError(f"--resume: no checkpoint in {paths.join(run_dir, 'checkpoints')}")
        lora.check_resume(cfg.lora, ckpt.meta(latest), paths.join(run_dir, "checkpoints"), tr.token_ids)
        target = {"params": tr.params, "opt_state": tr.opt_state, "key": key}
        if tr.ref_params is not None:
            target["ref_params"] = tr.ref_params
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
        state, meta = ckpt.restore(latest, target=abstract)
        tr.params, tr.opt_state, key = state["params"], state["opt_state"], state["key"]
        if tr.ref_params is not None:
            tr.ref_params = state["ref_params"]
        it.set_state(meta["data_state"])
        start = int(meta["step"])
    logger = MetricsLogger(run_dir, resume_step=start if resume else None)
    bar = _progress(g.steps, start, "grpo", progress)
    for step in range(start + 1, g.steps + 1):
        recs = next(it)
        key, sub = jax.random.split(key)
        metrics, _, _ = tr.step(recs, sub)
        metrics["lr"] = float(tr.sched(step - 1))
        logger.log(step, "grpo", metrics)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}")
        bar.update(1)
        if stop_after is not None and step >= stop_after:
            break
        if step % cfg.run.checkpoint_every == 0 or step == g.steps:
            state = {"params": tr.params, "opt_state": tr.opt_state, "key": key}
            if tr.ref_params is not None:
                state["ref_params"] = tr.ref_params
            ckpt.save(step, state, meta=checkpoint_meta(cfg, tr.model_cfg, step, it.get_state(), tr.token_ids))
            logger.sync()  # a gs:// run's metrics and tool cache go home with each checkpoint
            if getattr(actor, "cache", None) is not None:
                actor.cache.sync()
    ckpt.wait()
    ckpt.close()
    bar.close()
    logger.close()
    if getattr(actor, "cache", None) is not None:
        actor.cache.sync()
    return tr.policy()


def cli(args) -> int:
    from mtr_jax.train.setup import (check_out_dir, check_tools, load_records_from_config, load_tokenizer, make_actor,
                                     make_toolmaker, setup_model)

    cfg: Config = args.cfg
    lora.validate(cfg.lora)  # before any work
    check_out_dir(cfg)
    tokenizer = load_tokenizer(cfg)
    records = load_records_from_config(cfg)
    actor, toolmaker = make_actor(cfg), make_toolmaker(cfg)
    check_tools(actor, toolmaker)
    mesh, model_cfg, params = setup_model(cfg)
    print(f"grpo: {len(records)} questions, {cfg.grpo.steps} steps x {cfg.grpo.batch_size}x{cfg.grpo.group_size} -> {cfg.run.out_dir}")
    if jax.process_index() == 0:  # RUN_DIR/tokenizer, next to checkpoints/ (export-hf / eval find it there);
        # not inside it: on GCS orbax deletes any directory there without its commit marker
        with paths.local_dir_for_write(paths.join(cfg.run.out_dir, "tokenizer")) as d:
            tokenizer.save_pretrained(str(d))
    train_grpo(cfg, model_cfg, params, tokenizer, records, actor, toolmaker, cfg.run.out_dir, mesh=mesh,
               resume=args.resume)
    return 0
