"""Multi-turn episodes: sample -> parse -> validate -> simulate -> append -> ... as one batch.

B questions x G samples decode together. After each turn every still-running row is parsed; a
tool call goes to the ToolActor (one batched call for the whole turn), its `<tool_response>` turn
is tokenised on its own and appended through the sampler's continuation (the history is never
prefilled again, and the exact token ids the sampler produced are kept). An episode ends at an
answer, a malformed turn, an EOS-less turn that ran out of tokens, `max_turns`, or `max_len`.

Per episode we keep the token ids, a loss mask that is 1 exactly on sampled tokens, the sampler's
policy log-probs (at the sampling temperature, before top-k/top-p) on those tokens, the structured trace (the trace JSON of
`mtr_jax.traces`), and counters.

Several processes: each runs its own records' episodes (and its ToolActor answers its own calls);
the turn loop's exits are agreed, so every process calls the sampler the same number of times.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import numpy as np

from mtr_jax.data.records import QARecord
from mtr_jax.parallel import hosts
from mtr_jax.sampling import SamplingParams
from mtr_jax.traces import parse as trace_parse
from mtr_jax.traces import render as trace_render
from mtr_jax.tools import schema as tool_schema


@dataclass
class Episode:
    record: QARecord
    tools: list
    token_ids: list  # prompt + every turn, as sampled / appended
    prompt_len: int
    loss_mask: list  # 1 on sampled tokens
    logprobs: list  # sampler's plain log-probs on sampled tokens, 0 elsewhere
    turn_texts: list = field(default_factory=list)  # raw assistant outputs, one per turn
    observations: list = field(default_factory=list)  # observation strings, in call order
    calls_valid: list = field(default_factory=list)  # one bool per tool call
    messages: list = field(default_factory=list)  # trace JSON messages
    answer: str | None = None
    end_reason: str = ""  # answer | max_turns | max_len | length (a turn without EOS) | cache_full | prompt_too_long
    counters: dict = field(default_factory=lambda: {"turns": 0, "tool_calls": 0, "invalid_calls": 0, "tool_errors": 0,
                                                     "format_errors": 0})

    def trace(self) -> dict:
        return {
            "id": self.record.id, "dataset": self.record.dataset, "question": self.record.question,
            "golds": self.record.golds, "tools": self.tools, "messages": self.messages, "answer": self.answer,
        }


def _observation_text(obs) -> str:
    if hasattr(obs, "content"):
        return trace_render.observation_text(obs.content)
    return obs if isinstance(obs, str) else trace_render.observation_text(obs)


def run_episodes(
    sampler,
    params,
    tokenizer,
    records: list[QARecord],
    tools_per_record: list[list],
    actor,
    *,
    group_size: int = 1,
    sampling: SamplingParams = SamplingParams(greedy=True),
    max_turns: int = 4,
    max_new_tokens: int = 64,
    max_len: int = 1024,
    key=None,
    system_prompt: str | None = None,
    compact: bool = True,
) -> list[Episode]:
    """Runs len(records) * group_size episodes in one batch (row = record_index * G + g at the
    start). `compact`: after each turn the finished episodes' rows leave the batch whenever a
    smaller row bucket holds the rest (`Sampler.keep_rows`), so later turns cost only the
    episodes still running; the tokens are the same either way."""
    key = jax.random.PRNGKey(0) if key is None else key
    params = sampler.rollout_params(params)  # one compute-dtype copy for the whole rollout
    system_prompt = system_prompt or trace_render.SYSTEM_PROMPT
    eps: list[Episode] = []
    prompts = []
    for rec, tools in zip(records, tools_per_record):
        msgs = [{"role": "system", "content": system_prompt}, {"role": "user", "content": rec.question}]
        ids = trace_render.render_prompt_ids(tokenizer, msgs, tools)
        prompts.append(ids)
        for _ in range(group_size):
            eps.append(Episode(rec, tools, list(ids), len(ids), [0] * len(ids), [0.0] * len(ids), messages=[dict(m) for m in msgs]))
    n = len(eps)
    done = np.zeros(n, bool)
    # a prompt that leaves no room to generate is an episode with no answer, not a crashed batch
    for p, ids in enumerate(prompts):
        if len(ids) >= max_len:
            prompts[p] = ids[:1]
            for g in range(group_size):
                eps[p * group_size + g].end_reason, done[p * group_size + g] = "prompt_too_long", True
    state = sampler.start(params, prompts, group_size=group_size)
    slot = np.arange(n)  # episode i is row slot[i] of the sampler's batch (-1: left it)
    for turn in range(max_turns):
        active = ~done
        # several processes run each turn together: the loop ends, and the budget is set, globally
        if not hosts.any_(active.any()):
            break
        key, sub = jax.random.split(key)
        longest = max((len(e.token_ids) for e, a in zip(eps, active) if a), default=0)
        budget = min(max_new_tokens, max_len - hosts.agree_max(longest)[0])
        if budget <= 0:
            for i in np.nonzero(active)[0]:
                eps[i].end_reason, done[i] = "max_len", True
            break
        row_active = np.zeros(state.n_rows, bool)
        row_active[slot[active]] = True
        state, out = sampler.generate(params, state, max_new_tokens=budget, sampling=sampling, key=sub,
                                      active=row_active)
        pending = []  # (row, call, tools, record)
        format_errors: dict[int, str] = {}
        appended: list[list[int]] = [[] for _ in range(n)]
        for i in np.nonzero(active)[0]:
            e, r = eps[i], slot[i]
            L = int(out.lengths[r])
            toks = [int(t) for t in out.tokens[r, :L]]
            e.token_ids += toks
            e.loss_mask += [1] * L
            e.logprobs += [float(x) for x in out.policy_logprobs[r, :L]]
            text = tokenizer.decode(toks, skip_special_tokens=False)
            e.turn_texts.append(text)
            e.counters["turns"] += 1
            e.messages.append(trace_render.assistant_text_to_message(text))
            if out.stop_reason[r] != "eos":
                e.end_reason, done[i] = ("length" if out.stop_reason[r] == "length" else str(out.stop_reason[r])), True
                continue
            parsed = trace_parse.parse_turn(text)
            if parsed.kind == "answer":
                e.answer, e.end_reason, done[i] = parsed.answer, "answer", True
            elif parsed.kind == "tool_call":
                for call in parsed.calls:
                    pending.append((i, call, e.tools, e.record))
            else:
                # a malformed turn gets an error observation the model can act on, like a bad call
                e.counters["format_errors"] = e.counters.get("format_errors", 0) + 1
                format_errors[i] = trace_render.observation_text(parsed.error_observation())
        per_row: dict[int, list[str]] = {}
        for i, text in format_errors.items():
            eps[i].observations.append(text)
            eps[i].messages.append({"role": "tool", "name": "", "content": text})
            per_row[i] = [text]
        # one batched ToolActor call for the whole turn
        if pending:
            observations = actor.observe_batch([(c, t, r) for _, c, t, r in pending])
            for (i, call, tools, _), obs in zip(pending, observations):
                e = eps[i]
                e.counters["tool_calls"] += 1
                defn = next((t for t in tools if t["function"]["name"] == call.get("name")), None)
                valid = defn is not None and not tool_schema.validate_arguments(defn, call.get("arguments", {}))
                e.calls_valid.append(bool(valid))
                if not valid:
                    e.counters["invalid_calls"] += 1
                if not getattr(obs, "ok", True):
                    e.counters["tool_errors"] += 1
                text = _observation_text(obs)
                e.observations.append(text)
                e.messages.append({"role": "tool", "name": call.get("name", ""), "content": text})
                per_row.setdefault(i, []).append(text)
        for i, texts in per_row.items():
            ids = trace_render.tool_turn_ids(tokenizer, texts)
            e = eps[i]
            # the next turn needs room for the tool turn and at least one generated token
            if len(e.token_ids) + len(ids) + 1 > max_len or turn == max_turns - 1:
                e.end_reason, done[i] = ("max_len" if turn < max_turns - 1 else "max_turns"), True
                continue
            appended[i] = ids
            e.token_ids += ids
            e.loss_mask += [0] * len(ids)
            e.logprobs += [0.0] * len(ids)
        # before the append, so its prefill runs on the rows that go on only; not once all are done
        if compact and hosts.any_((~done).any()):
            live = np.nonzero(~done)[0]
            smaller = sampler.keep_rows(state, slot[live])
            if smaller is not state:
                state, slot = smaller, np.full(n, -1)
                slot[live] = np.arange(len(live))
        if hosts.any_(any(appended)):
            rows: list[list[int]] = [[] for _ in range(state.n_rows)]
            for i in np.nonzero(slot >= 0)[0]:
                rows[slot[i]] = appended[i]
            state = sampler.append(params, state, rows)
        elif not hosts.any_((~done).any()):
            break
    for i in range(n):
        if not done[i]:
            eps[i].end_reason = "max_turns"
    return eps
