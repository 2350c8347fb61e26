"""Multi-turn rollouts: assembly against the chat-template renderer, and sampler log-probs against a
teacher-forced forward pass, with a real jitted sampler on a tiny random model."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from mtr_jax.config import ToolsConfig
from mtr_jax.data.demo_tokenizer import demo_tokenizer_for_world
from mtr_jax.data.synthetic import make_world, split_world
from mtr_jax.model import qwen2
from mtr_jax.rollout.episodes import run_episodes
from mtr_jax.sampling import Sampler, SamplingParams
from mtr_jax.sampling.sampler import SampleOutput
from mtr_jax.tools.autoagent import AutoAgent
from mtr_jax.tools.toolactor import ToolActor
from mtr_jax.tools.toolmaker import ToolMaker
from mtr_jax.traces.render import render_trace


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = make_world(seed=0)
    train, _ = split_world(w, n_train=6, n_heldout=2, seed=0)
    actor = ToolActor.from_config(ToolsConfig(), str(tmp_path_factory.mktemp("c") / "cache.sqlite"))
    tm = ToolMaker("template")
    tools = [tm.make(r) for r in train]
    agent = AutoAgent("oracle", actor=actor)
    traces = [agent.make_trace(r, t)[0] for r, t in zip(train, tools)]
    tok = demo_tokenizer_for_world(w, extra_texts=[str(t) for t in traces])
    return train, tools, traces, actor, tok


class ReplaySampler:
    """Stands in for the sampler: emits the oracle trace's assistant turns token by token, so the
    rollout's assembly can be checked against the chat-template rendering of the same trace."""

    def __init__(self, tok, traces, group_size):
        self.turns = []
        for t in traces:
            ids, mask = render_trace(tok, t)
            runs, cur = [], []
            for i, m in zip(ids, mask):
                if m:
                    cur.append(i)
                elif cur:
                    runs.append(cur)
                    cur = []
            if cur:
                runs.append(cur)
            self.turns += [runs] * group_size
        self.k = 0

    def rollout_params(self, params):
        return params

    def start(self, params, prompts, group_size=1):
        return SimpleNamespace(n_rows=len(self.turns))

    def keep_rows(self, state, rows):  # finished rows leave the batch, as Sampler.keep_rows does
        self.turns = [self.turns[r] for r in rows]
        return SimpleNamespace(n_rows=len(rows))

    def generate(self, params, state, *, max_new_tokens, sampling, key, active=None):
        n = len(self.turns)
        toks = np.zeros((n, max_new_tokens), np.int32)
        lens = np.zeros(n, np.int32)
        for i in range(n):
            if active[i]:
                run = self.turns[i][self.k]
                toks[i, : len(run)] = run
                lens[i] = len(run)
        self.k += 1
        reasons = np.array(["eos" if a else "inactive" for a in active])
        lp = np.full((n, max_new_tokens), -0.5, np.float32)
        return state, SampleOutput(toks, lens, reasons, lp, lp, lp)

    def append(self, params, state, tokens):
        return state


def test_rollout_assembles_exactly_what_the_template_renders(world):
    train, tools, traces, actor, tok = world
    eps = run_episodes(ReplaySampler(tok, traces, 2), None, tok, train, tools, actor, group_size=2, max_turns=6,
                       max_new_tokens=200, max_len=4096)
    assert len(eps) == 2 * len(train)
    for k, e in enumerate(eps):
        ids, mask = render_trace(tok, traces[k // 2])
        # the template ends the last turn with "\n" after <|im_end|>, which nobody generates
        assert e.token_ids == ids[: len(e.token_ids)] and len(ids) - len(e.token_ids) <= 1
        assert e.loss_mask == mask[: len(e.token_ids)]
        assert e.end_reason == "answer" and e.answer == traces[k // 2]["answer"]
        assert all(e.calls_valid) and e.counters["invalid_calls"] == 0
        assert e.trace()["messages"][2:] == traces[k // 2]["messages"][2:]


def test_random_model_multi_turn_logprobs_match_teacher_forcing(world):
    train, tools, _, actor, tok = world
    cfg = qwen2.Qwen2Config(vocab_size=(len(tok) + 63) // 64 * 64, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    params = qwen2.init_params(cfg, jax.random.PRNGKey(1), std=0.2)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # a random model never writes <|im_end|>: let a quarter of the vocabulary end a turn too, so turns
    # end in malformed text, get an error observation, and the rollout goes on for several turns
    enders = [im_end] + list(range(300, 300 + len(tok) // 4))
    sampler = Sampler(cfg, cache_len=1024, eos_ids=enders, pad_id=tok.pad_token_id)
    eps = run_episodes(sampler, params, tok, train[:3], tools[:3], actor, group_size=2,
                       sampling=SamplingParams(temperature=1.0), max_turns=3, max_new_tokens=12, max_len=1024,
                       key=jax.random.PRNGKey(3))
    assert any(e.counters["turns"] > 1 for e in eps), "no episode reached a second turn"
    for e in eps:
        assert 1 <= e.counters["turns"] <= 3
        assert len(e.token_ids) == len(e.loss_mask) == len(e.logprobs)
        ids = np.asarray(e.token_ids)[None]
        logits = np.asarray(qwen2.forward(params, cfg, ids))[0].astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        for t in range(e.prompt_len, len(e.token_ids)):
            if e.loss_mask[t]:
                want = logits[t - 1, e.token_ids[t]] - logz[t - 1]
                assert abs(e.logprobs[t] - want) <= 1e-4, (t, e.logprobs[t], want)
        # the mask covers exactly the sampled turns, and everything between them is the tool turns
        runs, cur, k = [], [], e.prompt_len
        gaps = []
        while k < len(e.token_ids):
            j = k
            while j < len(e.token_ids) and e.loss_mask[j] == e.loss_mask[k]:
                j += 1
            (runs if e.loss_mask[k] else gaps).append(e.token_ids[k:j])
            k = j
        assert len(runs) == e.counters["turns"]
        from mtr_jax.traces.render import tool_turn_ids
        assert gaps == [tool_turn_ids(tok, [o]) for o in e.observations][: len(gaps)]


def test_finished_rows_leave_the_batch_with_the_same_tokens(world):
    """Greedy episodes that end at different turns (a random model; an eighth of the vocabulary
    ends a turn, so some turns run out of tokens): with compaction the finished rows leave the
    batch (12 rows in a bucket of 16, then 8, then 4), and every token, log-prob and end reason is
    what the full batch gives."""
    train, tools, _, actor, tok = world
    cfg = qwen2.Qwen2Config(vocab_size=(len(tok) + 63) // 64 * 64, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    params = qwen2.init_params(cfg, jax.random.PRNGKey(2), std=0.2)
    enders = [tok.convert_tokens_to_ids("<|im_end|>")] + list(range(300, 300 + len(tok) // 8))
    runs = {}
    for compact in (False, True):
        sampler = Sampler(cfg, cache_len=1024, eos_ids=enders, pad_id=tok.pad_token_id)
        eps = run_episodes(sampler, params, tok, train, tools, actor, group_size=2, max_turns=4, max_new_tokens=12,
                           max_len=1024, compact=compact)
        runs[compact] = (eps, sampler._select._cache_size())
    (full, n_full), (small, n_small) = runs[False], runs[True]
    turns = sorted(e.counters["turns"] for e in full)
    assert turns[0] < turns[-1], turns  # the episodes end at different turns
    assert n_full == 0 and n_small >= 1  # the batch was compacted (once per smaller bucket)
    for a, b in zip(full, small):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        assert (a.end_reason, a.counters, a.observations) == (b.end_reason, b.counters, b.observations)
