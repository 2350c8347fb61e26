"""The LLM interface (mtr_jax.llm) without the real model: the masked decode step against the
sampler's own greedy loop, constrained decoding that keeps even a random-weight model at the real
vocabulary inside a JSON Schema, the generation-time tightening, the roles' wiring (answer leakage
off in eval, unanswerable tools found before any work)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jsonschema import Draft202012Validator

from mtr_jax.config import Config, ToolsConfig
from mtr_jax.data.records import Paragraph, QARecord
from mtr_jax.errors import MtrError
from mtr_jax.llm import FnLLM, as_llm, complete, make_llm
from mtr_jax.llm.local import LocalLLM, tighten
from mtr_jax.model import qwen2
from mtr_jax.sampling.sampler import Sampler, SamplingParams
from mtr_jax.tools.schema import validate_observation, validate_tool
from mtr_jax.tools.toolactor import ToolActor
from mtr_jax.tools.toolmaker import GENERATION_SCHEMA, SEARCH, ToolMaker, complete_tool, template_tools
from util import tiny_config


def _params(cfg, seed=0):
    return qwen2.init_params(cfg, jax.random.PRNGKey(seed))


def test_step_masked_all_allowed_is_greedy_generate():
    """With every token allowed, step_masked token by token equals generate's greedy loop."""
    cfg = tiny_config()
    params = _params(cfg)
    prompts = [[1, 5, 9, 12], [3, 4]]
    s = Sampler(cfg, cache_len=64, eos_ids=[])
    _, ref = s.generate(params, s.start(params, prompts), max_new_tokens=10, sampling=SamplingParams(greedy=True), key=0)
    state = s.start(params, prompts)
    bits = np.full((2, -(-cfg.vocab_size // 32)), -1, np.int32)
    got = []
    for _ in range(10):
        state, toks = s.step_masked(params, state, bits, np.ones(2, bool))
        got.append(toks)
    np.testing.assert_array_equal(np.stack(got, 1), ref.tokens)
    assert list(state.row_lengths) == [14, 12]


def test_step_masked_obeys_the_mask_and_inactive_rows():
    cfg = tiny_config()
    params = _params(cfg)
    s = Sampler(cfg, cache_len=32, eos_ids=[])
    state = s.start(params, [[1, 2, 3], [4, 5, 6]])
    bits = np.zeros((2, -(-cfg.vocab_size // 32)), np.int32)
    bits[0, 200 // 32] = np.int32(1 << (200 % 32))  # row 0: only token 200
    bits[1, 33 // 32] = np.int32(1 << (33 % 32))
    bits[1, 31 // 32] |= np.int32(-(1 << 31))  # bit 31 (token 31): the sign bit
    state, toks = s.step_masked(params, state, bits, np.array([True, True]))
    assert toks[0] == 200 and toks[1] in (31, 33)
    state, toks2 = s.step_masked(params, state, bits, np.array([True, False]))
    assert toks2[0] == 200 and toks2[1] == toks[1]  # an inactive row keeps its pending token
    assert list(state.row_lengths) == [5, 4]


def test_tighten_is_a_subset_of_the_schema():
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "array", "items": {"type": "string"}},
                                               "c": {"type": "string", "enum": ["x"]}}}
    t = tighten(schema)
    assert t["properties"]["a"]["maxLength"] == 200 and t["properties"]["b"]["maxItems"] == 3
    assert "maxLength" not in t["properties"]["c"] and "maxLength" not in schema["properties"]["a"]
    ok = {"a": "s" * 200, "b": ["1", "2", "3"]}
    assert Draft202012Validator(t).is_valid(ok) and Draft202012Validator(schema).is_valid(ok)
    assert not Draft202012Validator(t).is_valid({"a": "s" * 201})


@pytest.fixture(scope="module")
def random_llm():
    """Random weights at the real Qwen2.5 vocabulary (151936) with the real tokenizer: whatever
    such a model prefers, the grammar must keep its reply valid."""
    from qwen_tokenizer import qwen25_tokenizer

    cfg = tiny_config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=2048)
    return LocalLLM(_params(cfg, 3), cfg, qwen25_tokenizer(), name="random", max_len=4096, batch=4, max_tokens=200)


def test_constrained_decoding_random_model_is_valid(random_llm):
    obs_schema = SEARCH["returns"]["anyOf"][0]
    convs = [[{"role": "user", "content": f"simulate search {i}"}] for i in range(3)]
    replies = random_llm.chat(convs, [obs_schema] * 3, max_tokens=200)
    for r in replies:
        assert isinstance(r, str), r
        assert validate_observation(SEARCH, json.loads(r)) == [], r
    # a tool definition: GENERATION_SCHEMA, then the protocol's completion, validates as a tool
    # (a random model may spell every string out to its maxLength one byte a token: the worst case)
    (tools,) = random_llm.chat([[{"role": "user", "content": "design a tool"}]], [GENERATION_SCHEMA], max_tokens=3500)
    assert isinstance(tools, str), tools
    items = json.loads(tools)
    assert 1 <= len(items) <= 2 and all(validate_tool(complete_tool(t)) == [] for t in items), tools
    free = random_llm.chat(convs[:1], max_tokens=8)  # no schema: the jitted loop, any text
    assert isinstance(free[0], str)
    assert random_llm.stats["constrained_tokens"] > 0 and random_llm.stats["free_tokens"] > 0


def test_constrained_cut_at_budget_is_an_error_not_bad_json(random_llm):
    from mtr_jax.llm import BackendError

    (r,) = random_llm.chat([[{"role": "user", "content": "x"}]], [SEARCH["returns"]["anyOf"][0]], max_tokens=3)
    assert isinstance(r, BackendError) and "cut at max_tokens=3" in str(r)


def test_prompt_longer_than_context_is_refused(random_llm):
    from mtr_jax.llm import BackendError

    (r,) = random_llm.chat([[{"role": "user", "content": "word " * 5000}]])
    assert isinstance(r, BackendError) and "llm_max_len" in str(r)


def test_fn_llm_and_factory_errors():
    llm = as_llm(lambda p: p.upper())
    assert complete(llm, "hi") == "HI" and as_llm(llm) is llm and as_llm(None) is None
    boom = FnLLM(lambda p: 1 / 0)
    assert "ZeroDivisionError" in str(boom.chat([[{"role": "user", "content": "x"}]])[0])
    with pytest.raises(MtrError, match="tools.llm"):
        make_llm(ToolsConfig(toolactor="llm"))
    with pytest.raises(MtrError, match="base_url"):
        ToolActor.from_config(ToolsConfig(toolactor="http"))


REC = QARecord(id="q1", question="Who founded Acme?", golds=["Jane Roe"], dataset="x",
               context=[Paragraph("Acme", ["Acme was founded by Jane Roe."])])


def test_actor_never_sees_the_answer_unless_asked(tmp_path):
    seen = []
    good = json.dumps({"results": [{"title": "Acme", "text": "Acme was founded by Jane Roe."}]})
    hook = lambda p: (seen.append(p), good)[1]
    call = {"name": "search", "arguments": {"query": "Acme"}}
    blind = ToolActor.from_config(ToolsConfig(toolactor="llm"), generate=hook)
    assert blind.observe(call, [SEARCH], REC).ok and "Its answer is" not in seen[-1]
    told = ToolActor.from_config(ToolsConfig(toolactor="llm", actor_sees_answer=True), generate=hook)
    assert told.observe(call, [SEARCH], REC).ok and "Its answer is: Jane Roe" in seen[-1]
    assert told.counters["answer_shown"] == 1 and told.backend_id.endswith(":sees_answer")
    # eval builds its actor with for_eval=True: the option is off whatever the config says
    from mtr_jax.train.setup import make_actor

    cfg = Config()
    cfg.tools.actor_sees_answer, cfg.tools.toolactor, cfg.tools.cache = True, "corpus", str(tmp_path / "c.sqlite")
    assert make_actor(cfg, for_eval=True).sees_answer is False and make_actor(cfg).sees_answer is True


def test_unanswerable_tools_are_known_before_any_work(tmp_path):
    from mtr_jax.train.setup import check_tools
    from mtr_jax.tools.toolmaker import ToolSetMaker

    odd = complete_tool({"type": "function", "function": {"name": "birth_year", "description": "year a person was born",
                         "parameters": {"type": "object", "properties": {"person": {"type": "string", "description": "who"}}}},
                         "returns": {"type": "object", "properties": {"year": {"type": "integer", "description": "y"}}}})
    assert validate_tool(odd) == []
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"id": "q1", "dataset": "x", "tools": template_tools("bridge") + [odd]}) + "\n")
    maker = ToolSetMaker(path, ToolMaker())
    corpus = ToolActor("corpus")
    assert corpus.unanswerable(maker.sets.values()) == ["birth_year"]
    with pytest.raises(MtrError, match="cannot answer birth_year; set tools.toolactor to llm or http"):
        check_tools(corpus, maker)
    check_tools(ToolActor("llm", llm=FnLLM(lambda p: "{}")), maker)  # a model simulates it: fine


def test_toolmaker_batch_feedback_goes_back_in_the_same_chat():
    convs = []

    class Rec:
        name = "rec"

        def chat(self, conversations, schemas=None, max_tokens=None):
            convs.append([list(c) for c in conversations])
            return ["not json"] * len(conversations)

    maker = ToolMaker("llm", llm=Rec(), retries=1)
    recs = [QARecord(id=str(i), question=f"Who founded company {i}?", golds=["x"], dataset="t") for i in range(3)]
    out = maker.make_batch(recs)
    assert [len(t) for t in out] == [2, 2, 2]  # the utility tools only
    assert len(convs) == 2 and len(convs[0]) == 3 and len(convs[1][0]) == 3  # one batch per attempt
    assert convs[1][0][1] == {"role": "assistant", "content": "not json"} and "not a JSON list" in convs[1][0][2]["content"]
    assert maker.stats.dropped == 6


def test_a_trace_that_does_not_render_is_skipped_and_counted(capsys):
    from qwen_tokenizer import qwen25_tokenizer

    from mtr_jax.tools.autoagent import AutoAgent
    from mtr_jax.train.sft import traces_to_examples

    rec = QARecord(id="t", question="Who founded Acme?", golds=["Jane Roe"], dataset="x",
                   context=[Paragraph("Acme", ["Acme was founded by Jane Roe."])], supporting=[("Acme", 0)])
    good, reason = AutoAgent("oracle", ToolActor("corpus")).make_trace(rec, template_tools("bridge"))
    assert reason == ""
    bad = dict(good, id="bad", messages=[{"role": "system"}])  # no content: cannot be rendered
    examples, dropped = traces_to_examples(qwen25_tokenizer(), [good, bad, good], 4096)
    assert len(examples) == 2 and dropped == 1
    assert "1 of 3 traces dropped" in capsys.readouterr().err
    with pytest.raises(MtrError, match="no valid traces"):
        traces_to_examples(qwen25_tokenizer(), [bad], 4096)
