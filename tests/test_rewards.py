"""EM/F1 against the official scripts' functions (tests/official_eval.py) and hand-computed values;
the composite trace reward against hand-computed values."""

import pytest

import official_eval as off
from mtr_jax.errors import MtrError
from mtr_jax.rewards import (
    RewardWeights,
    check_format,
    exact_match,
    f1,
    final_answer,
    normalize_answer,
    trace_reward,
)

# (prediction, golds, hand EM, hand F1)
CASES = [
    ("Paris", ["Paris"], 1, 1.0),
    ("paris", ["Paris"], 1, 1.0),  # case
    ("PARIS!", ["Paris"], 1, 1.0),  # punctuation
    ("The Beatles", ["Beatles"], 1, 1.0),  # article
    ("a dog", ["the dog"], 1, 1.0),
    ("An apple", ["apple"], 1, 1.0),
    ("theater", ["theater"], 1, 1.0),  # 'the' inside a word stays
    ("Anne", ["anne"], 1, 1.0),  # 'an' inside a word stays
    ("U.S.A.", ["USA"], 1, 1.0),
    ("rock-and-roll", ["rockandroll"], 1, 1.0),  # ASCII hyphen removed, tokens join
    ("rock and roll", ["rock-and-roll"], 0, 0.0),
    ("1932\u20131987", ["1932-1987"], 0, 0.0),  # en dash is not string.punctuation: kept
    ("1932\u20141987", ["1932\u20141987"], 1, 1.0),  # em dash on both sides
    ("Jean\u2013Luc", ["jean\u2013luc"], 1, 1.0),
    ("\u201cHello\u201d", ["hello"], 0, 0.0),  # curly quotes kept
    ("'Hello'", ["hello"], 1, 1.0),  # ASCII quotes removed
    ("  New   York  City ", ["new york city"], 1, 1.0),  # whitespace
    ("New York", ["New York City"], 0, 0.8),  # P=1 R=2/3
    ("New York City, USA", ["New York City"], 0, 6 / 7),  # P=3/4 R=1
    ("1,000", ["1000"], 1, 1.0),  # numbers
    ("3.14", ["314"], 1, 1.0),
    ("42", ["forty-two"], 0, 0.0),
    ("1999", ["1999"], 1, 1.0),
    ("20 June 1837", ["June 20, 1837"], 0, 1.0),  # same bag of tokens
    ("", ["Paris"], 0, 0.0),  # empty prediction
    ("", [""], 1, 0.0),  # official: EM true, F1 0 (no common token)
    ("the", ["a"], 1, 0.0),  # both normalise to ""
    ("yes", ["Yes"], 1, 1.0),
    ("yes", ["no"], 0, 0.0),
    ("yes it is", ["yes"], 0, 0.0),  # hotpot special case (SQuAD would give 0.5)
    ("no", ["no way"], 0, 0.0),  # hotpot special case on the prediction side
    ("noanswer", ["noanswer"], 1, 1.0),
    ("no answer", ["noanswer"], 0, 0.0),
    ("Barack Obama", ["Obama", "Barack Obama"], 1, 1.0),  # aliases
    ("Obama", ["Barack Hussein Obama", "President Obama"], 0, 2 / 3),  # max over aliases
    ("NYC", ["New York City", "NYC", "New York"], 1, 1.0),
    ("the the the", ["the"], 1, 0.0),
    ("Obama Obama", ["Obama"], 0, 2 / 3),  # repeated tokens counted once in the overlap
    ("cat dog", ["dog cat"], 0, 1.0),
    ("Chief of Protocol", ["Chief of Protocol of the United States"], 0, 2 / 3),
    ("\u00c9ire", ["\u00e9ire"], 1, 1.0),  # unicode lowercasing
    ("na\u00efve", ["naive"], 0, 0.0),  # no accent folding
    ("S\u00e3o Paulo", ["Sao Paulo"], 0, 0.5),
    ("Hello\tWorld\n", ["hello world"], 1, 1.0),
    ("$5 million", ["5 million"], 1, 1.0),
    ("50%", ["50"], 1, 1.0),
    ("Mr. Smith", ["mr smith"], 1, 1.0),
    ("A", ["a"], 1, 0.0),
]
HOTPOT_SPECIAL = {"yes it is", "no", "no answer"}


def test_case_table_size():
    assert len(CASES) >= 40


@pytest.mark.parametrize("pred,golds,em,f", CASES)
def test_em_f1_hand_and_official(pred, golds, em, f):
    assert exact_match(pred, golds) == em
    assert f1(pred, golds) == pytest.approx(f, abs=1e-12)
    # official HotpotQA functions, max over aliases
    assert exact_match(pred, golds) == float(max(off.exact_match_score(pred, g) for g in golds))
    assert f1(pred, golds) == pytest.approx(max(off.f1_score(pred, g)[0] for g in golds), abs=1e-12)
    # official SQuAD v1.1 (identical except HotpotQA's yes/no/noanswer rule)
    assert exact_match(pred, golds) == float(off.metric_max_over_ground_truths(off.squad_exact_match_score, pred, golds))
    if pred not in HOTPOT_SPECIAL:
        sq = off.metric_max_over_ground_truths(off.squad_f1_score, pred, golds)
        assert f1(pred, golds) == pytest.approx(sq, abs=1e-12)
    assert normalize_answer(pred) == off.normalize_answer(pred)


def test_squad_differs_only_by_hotpot_rule():
    assert off.metric_max_over_ground_truths(off.squad_f1_score, "yes it is", ["yes"]) == pytest.approx(0.5)
    assert f1("yes it is", ["yes"]) == 0.0


def test_no_golds_and_string_gold():
    assert exact_match("apple", []) == 0.0 and f1("apple", []) == 0.0
    assert exact_match("Paris", "paris") == 1.0 and f1("Paris", "paris") == 1.0


# ---------------------------------------------------------------------------------------------
# Trace reward. Default weights: w_answer=1, w_consistency=0.5, format_penalty=-1, EM, ground_f1=0.8.

CALL = '<think>I need the office.</think>\n<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_call>'
OBS_PROTOCOL = '{"result": "She served as Chief of Protocol of the United States."}'


def R(turns, obs, valid, golds, **w):
    return trace_reward(turns, obs, valid, golds, RewardWeights(**w))


def test_perfect_trace():
    r = R([CALL, "<think>Found it.</think>\n<answer>Chief of Protocol</answer><|im_end|>"], [OBS_PROTOCOL], [True],
          ["Chief of Protocol"])
    assert r == {"reward": 1.5, "format_ok": 1.0, "correctness": 1.0, "em": 1.0, "f1": 1.0, "call_validity": 1.0,
                 "grounded": 1.0, "not_contradicted": 1.0, "consistency": 1.0, "length": 0.0}


def test_wrong_but_grounded():
    r = R([CALL, "<answer>Ghana</answer>"], ['{"result": "She was ambassador to Ghana."}'], [True], ["Chief of Protocol"])
    assert (r["em"], r["f1"], r["grounded"], r["consistency"]) == (0.0, 0.0, 1.0, 1.0)
    assert r["reward"] == pytest.approx(0.5)


def test_no_calls_is_valid_but_not_grounded():
    r = R(["<think>I know this.</think><answer>Paris</answer>"], [], [], ["Paris"])
    assert (r["call_validity"], r["grounded"], r["not_contradicted"]) == (1.0, 0.0, 1.0)
    assert r["consistency"] == pytest.approx(2 / 3)
    assert r["reward"] == pytest.approx(1 + 0.5 * 2 / 3)


def test_half_valid_calls():
    r = R([CALL, CALL, "<answer>Chief of Protocol</answer>"], [OBS_PROTOCOL, OBS_PROTOCOL], [True, False],
          ["chief of protocol"])
    assert r["call_validity"] == 0.5
    assert r["consistency"] == pytest.approx(2.5 / 3)
    assert r["reward"] == pytest.approx(1 + 0.5 * 2.5 / 3)


def test_contradicted_answer():
    # grounded (the token run 'lyon' occurs) but explicitly ruled out
    r = R([CALL, "<answer>Lyon</answer>"], ["The capital of France is not Lyon."], [True], ["Paris"])
    assert (r["grounded"], r["not_contradicted"], r["em"]) == (1.0, 0.0, 0.0)
    assert r["reward"] == pytest.approx(0.5 * 2 / 3)


@pytest.mark.parametrize("obs", ["Lyon was not the capital.", "Lyon isn't the capital.", "It is never Lyon.",
                                 "The capital is no longer Lyon."])
def test_contradiction_patterns(obs):
    assert R(["<answer>Lyon</answer>"], [obs], [True], ["x"])["not_contradicted"] == 0.0


def test_error_observations_neither_ground_nor_contradict():
    r = R([CALL, "<answer>Paris</answer>"], ['{"error": "unknown entity Paris"}', "Error: not Paris"], [False, True],
          ["Paris"])
    assert (r["call_validity"], r["grounded"], r["not_contradicted"]) == (0.5, 0.0, 1.0)
    assert r["reward"] == pytest.approx(1 + 0.5 * 1.5 / 3)


def test_f1_correctness():
    r = R([CALL, "<answer>New York</answer>"], ["He lived in New York City."], [True], ["New York City"],
          correctness="f1")
    assert (r["em"], r["f1"], r["correctness"]) == (0.0, pytest.approx(0.8), pytest.approx(0.8))
    assert r["reward"] == pytest.approx(0.8 + 0.5)


def test_window_f1_grounding_threshold():
    turns, obs = [CALL, "<answer>Shirley Temple Black</answer>"], ["Shirley Temple was an actress."]
    # best window of 3 tokens: 'shirley temple was' -> F1 2/3
    r = R(turns, obs, [True], ["Shirley Temple"])
    assert (r["grounded"], r["em"], r["f1"]) == (0.0, 0.0, pytest.approx(0.8))
    assert r["reward"] == pytest.approx(0.5 * 2 / 3)
    r = R(turns, obs, [True], ["Shirley Temple"], ground_f1=0.6)
    assert r["grounded"] == 1.0 and r["reward"] == pytest.approx(0.5)


def test_grounding_is_whole_token():
    r = R([CALL, "<answer>1</answer>"], ["born in 1999"], [True], ["1"])
    assert r["grounded"] == 0.0
    assert r["reward"] == pytest.approx(1 + 0.5 * 2 / 3)


@pytest.mark.parametrize(
    "turns,reason",
    [
        (["<think>abc<answer>Paris</answer>"], "<think> not closed"),
        (["<think>x</think><tool_call>{}</tool_call>"], "no final answer"),
        (["<answer>A</answer>", "<answer>B</answer>"], "2 answers"),
        (['<tool_call>{}</tool_call><tool_response>{"r": "Paris"}</tool_response><answer>Paris</answer>'],
         "fabricated <tool_response>"),
        (["<think><answer>Paris</think></answer>"], "unbalanced </think>"),
        (["<answer>  </answer>"], "empty answer"),
        (["<think><think>x</think></think><answer>Paris</answer>"], "<think> opened inside itself"),
        (["</tool_call><answer>Paris</answer>"], "unbalanced </tool_call>"),
        (["<think>a</think>", "<answer>Paris</think>"], "unbalanced </think>"),
    ],
)
def test_format_gate(turns, reason):
    ok, why = check_format(turns)
    assert not ok and reason in why
    r = R(turns, ["Paris"], [True], ["Paris"])
    assert r["format_ok"] == 0.0 and r["reward"] == -1.0


def test_custom_weights_and_penalty():
    w = dict(w_answer=2.0, w_consistency=1.0, format_penalty=-0.5)
    assert R(["no tags at all"], [], [], ["Paris"], **w)["reward"] == -0.5
    r = R([CALL, "<answer>the Paris</answer>"], ["Paris, France"], [True], ["Paris"], **w)
    assert r["reward"] == pytest.approx(2.0 + 1.0)


def test_final_answer_is_last():
    assert final_answer(["<answer> a </answer>", "x <answer>b</answer> y"]) == "b"
    assert final_answer(["none"]) == ""


def test_from_config_and_bad_correctness():
    from mtr_jax.config import GRPOConfig

    w = RewardWeights.from_config(GRPOConfig(w_answer=3.0, correctness="f1"))
    assert (w.w_answer, w.correctness, w.ground_f1) == (3.0, "f1", 0.8)
    with pytest.raises(MtrError, match="correctness"):
        R(["<answer>x</answer>"], [], [], ["x"], correctness="acc")


def test_length_penalty():
    """w_length: reward -= w_length * length (generated tokens / budget, clipped to [0, 1]) when the
    format gate passes; a failed gate scores format_penalty whatever the length."""
    turns, obs, golds = [CALL, "<answer>Chief of Protocol</answer>"], [OBS_PROTOCOL], ["Chief of Protocol"]
    w = RewardWeights(w_length=0.2)
    assert trace_reward(turns, obs, [True], golds, w)["reward"] == pytest.approx(1.5)  # no length given
    short, long_ = (trace_reward(turns, obs, [True], golds, w, length=x) for x in (0.25, 0.75))
    assert (short["reward"], long_["reward"]) == (pytest.approx(1.5 - 0.05), pytest.approx(1.5 - 0.15))
    assert short["length"] == 0.25
    assert trace_reward(turns, obs, [True], golds, w, length=3.0)["reward"] == pytest.approx(1.3)  # clipped
    assert trace_reward(turns, obs, [True], golds, RewardWeights(), length=0.75)["reward"] == pytest.approx(1.5)
    assert trace_reward(["<answer>x"], obs, [True], golds, w, length=0.1)["reward"] == -1.0


def test_grpo_scores_length_of_generated_tokens():
    """The GRPO trainer gives the reward each episode's sampled-token count over its budget."""
    from types import SimpleNamespace

    from mtr_jax.config import GRPOConfig
    from mtr_jax.train.grpo import GRPOTrainer

    g = GRPOConfig(w_length=0.5, max_turns=2, max_new_tokens=10)
    rec = SimpleNamespace(golds=["Chief of Protocol"])
    ep = SimpleNamespace(turn_texts=[CALL, "<answer>Chief of Protocol</answer>"], observations=[OBS_PROTOCOL],
                         calls_valid=[True], record=rec, loss_mask=[0] * 30 + [1] * 5 + [0] * 9 + [1] * 3)
    (s,) = GRPOTrainer.score(SimpleNamespace(g=g), [ep])
    assert s["length"] == pytest.approx(8 / 20) and s["reward"] == pytest.approx(1.5 - 0.5 * 8 / 20)
