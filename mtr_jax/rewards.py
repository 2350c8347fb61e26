"""Answer metrics (EM/F1 exactly as the official SQuAD v1.1 / HotpotQA scripts) and the composite
trace reward that GRPO optimises.

Metrics
-------
`normalize_answer(s)`: lowercase, drop ASCII punctuation (`string.punctuation`; unicode dashes and
quotes are *kept*, as in the official scripts), drop the words a/an/the, collapse whitespace.
`exact_match(pred, golds)` and `f1(pred, golds)`: max over the gold aliases of the official
per-gold score. F1 keeps hotpot_evaluate_v1's special case: if either side normalises to
"yes", "no" or "noanswer" and the two differ, F1 is 0.

Trace reward
------------
Inputs: the assistant turn texts of one episode (in order), the observation strings the tools
returned, one validity boolean per tool call (the call parsed and validated against its tool's
JSON Schema), the gold answers, and `RewardWeights`.

    R = format_penalty                                               if the format gate fails
    R = w_answer * correctness + w_consistency * consistency
        - w_length * length                                          otherwise
    correctness  = EM or F1 of the final answer vs the golds (`RewardWeights.correctness`)
    consistency  = (call_validity + grounded + not_contradicted) / 3

    length       = the episode's generated tokens / its budget (max_turns x max_new_tokens), in
                   [0, 1]; 0 when the caller gives none. With w_length > 0 (default 0), of two
                   episodes that score the same the shorter one scores higher: a length penalty, as
                   in Kimi k1.5's length reward and OTC's tool-efficiency reward.

Format gate (any one fails it): a tag among <think>, <answer>, <tool_call> not balanced within
its turn (every open closed, in nesting order, none left open); an assistant turn containing
<tool_response> or </tool_response> (a fabricated observation); no <answer> block, or an empty
one; more than one <answer> block in the whole episode.
The final answer is the content of the last <answer>...</answer> (stripped).

Consistency components (each in [0, 1]):
- call_validity   = valid calls / calls; 1 when the episode made no call (nothing invalid).
- grounded        = 1 if some usable observation supports the answer, else 0 (also 0 with no
                    usable observation: an answer from nowhere is not grounded). An observation
                    supports the answer if the normalised answer occurs in the normalised
                    observation as a whole-token run, or the best token-F1 between the answer and
                    any window of the observation of the answer's length is >= `ground_f1`.
- not_contradicted = 0 if some usable observation rules the answer out, else 1. "Ruled out" is
                    checked on normalised text, as an explicit negation of the answer:
                    "not A", "never A", "no longer A", "A is|was|are|were not",
                    "A isnt|wasnt|arent|werent" (A = normalised answer, whole tokens).
Usable observation: not an error. An error observation is a JSON object with a top-level "error"
key, or text starting with "error" (case-insensitive); an error's text may echo the call's
arguments, so it neither grounds nor contradicts anything.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 / HotpotQA normalisation, same order of steps as the official scripts."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _as_golds(golds) -> list[str]:
    if isinstance(golds, str):
        return [golds]
    return [g for g in golds if isinstance(g, str)]


def exact_match(prediction: str, golds) -> float:
    """1.0 if the normalised prediction equals some normalised gold, else 0.0 (0.0 with no golds)."""
    p = normalize_answer(prediction or "")
    return float(any(p == normalize_answer(g) for g in _as_golds(golds)))


def _f1_one(p: str, g: str) -> float:
    """Official hotpot_evaluate_v1 F1 on already-normalised strings."""
    if p != g and (p in ("yes", "no", "noanswer") or g in ("yes", "no", "noanswer")):
        return 0.0
    pt, gt = p.split(), g.split()
    same = sum((Counter(pt) & Counter(gt)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pt), same / len(gt)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, golds) -> float:
    """Max token F1 over the gold aliases (0.0 with no golds)."""
    p = normalize_answer(prediction or "")
    return max((_f1_one(p, normalize_answer(g)) for g in _as_golds(golds)), default=0.0)


# ---------------------------------------------------------------------------------------------
# Trace reward.


@dataclass
class RewardWeights:
    w_answer: float = 1.0
    w_consistency: float = 0.5
    format_penalty: float = -1.0
    correctness: str = "em"  # em | f1
    ground_f1: float = 0.8  # window token-F1 at or above which an observation grounds the answer
    w_length: float = 0.0  # weight of the generated-length penalty (0: off)

    @classmethod
    def from_config(cls, cfg) -> "RewardWeights":
        """From a GRPOConfig-like object; fields it lacks keep their defaults."""
        kw = {k: getattr(cfg, k) for k in cls.__dataclass_fields__ if hasattr(cfg, k)}
        return cls(**kw)


_TAG = re.compile(r"<(/?)(think|answer|tool_call)>")
_RESPONSE_TAG = re.compile(r"</?tool_response>")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def check_format(turns: list[str]) -> tuple[bool, str]:
    """(ok, reason) of the format gate; reason is "" when ok."""
    n_answers = 0
    for i, text in enumerate(turns):
        if _RESPONSE_TAG.search(text):
            return False, f"turn {i}: fabricated <tool_response>"
        stack: list[str] = []
        for m in _TAG.finditer(text):
            closing, tag = m.group(1) == "/", m.group(2)
            if not closing:
                if tag in stack:
                    return False, f"turn {i}: <{tag}> opened inside itself"
                stack.append(tag)
            elif not stack or stack[-1] != tag:
                return False, f"turn {i}: unbalanced </{tag}>"
            else:
                stack.pop()
        if stack:
            return False, f"turn {i}: <{stack[-1]}> not closed"
        n_answers += len(_ANSWER.findall(text))
    if n_answers == 0:
        return False, "no final answer"
    if n_answers > 1:
        return False, f"{n_answers} answers"
    if not final_answer(turns).strip():
        return False, "empty answer"
    return True, ""


def final_answer(turns: list[str]) -> str:
    """Content of the last <answer>...</answer> across the turns ("" if none)."""
    for text in reversed(turns):
        found = _ANSWER.findall(text)
        if found:
            return found[-1].strip()
    return ""


def is_error_observation(obs: str) -> bool:
    s = obs.strip()
    if s.lower().startswith("error"):
        return True
    try:
        d = json.loads(s)
    except (ValueError, RecursionError):
        return False
    return isinstance(d, dict) and "error" in d


def _contains_tokens(hay: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(hay[i : i + n] == needle for i in range(len(hay) - n + 1))


def _window_f1(answer: list[str], obs: list[str]) -> float:
    """Best token F1 between the answer and any window of the observation of the answer's length."""
    n = len(answer)
    if n == 0 or not obs:
        return 0.0
    best = 0.0
    for i in range(max(1, len(obs) - n + 1)):
        best = max(best, _f1_one(" ".join(answer), " ".join(obs[i : i + n])))
    return best


def grounded(answer: str, observations: list[str], threshold: float = 0.8) -> float:
    a = normalize_answer(answer).split()
    if not a:
        return 0.0
    for obs in observations:
        if is_error_observation(obs):
            continue
        o = normalize_answer(obs).split()
        if _contains_tokens(o, a) or _window_f1(a, o) >= threshold:
            return 1.0
    return 0.0


def contradicted(answer: str, observations: list[str]) -> bool:
    a = normalize_answer(answer)
    if not a:
        return False
    q = re.escape(a)
    neg = re.compile(
        rf"\b(?:not|never|no longer) {q}\b|\b{q} (?:is|was|are|were) not\b|\b{q} (?:isnt|wasnt|arent|werent)\b"
    )
    return any(neg.search(normalize_answer(o)) for o in observations if not is_error_observation(o))


def trace_reward(
    turns: list[str],
    observations: list[str],
    call_valid: list[bool],
    golds,
    weights: RewardWeights | None = None,
    length: float = 0.0,
) -> dict[str, float]:
    """Composite reward of one episode and every component (all floats; see the module docstring)."""
    w = weights or RewardWeights()
    if w.correctness not in ("em", "f1"):
        from mtr_jax.errors import MtrError

        raise MtrError(f"grpo.correctness must be 'em' or 'f1', got {w.correctness!r}")
    ok, _ = check_format(turns)
    answer = final_answer(turns)
    em, f = exact_match(answer, golds), f1(answer, golds)
    validity = sum(bool(v) for v in call_valid) / len(call_valid) if call_valid else 1.0
    ground = grounded(answer, observations, w.ground_f1)
    not_contra = 0.0 if contradicted(answer, observations) else 1.0
    consistency = (validity + ground + not_contra) / 3.0
    correctness = em if w.correctness == "em" else f
    length = min(max(float(length), 0.0), 1.0)
    if ok:
        reward = w.w_answer * correctness + w.w_consistency * consistency - w.w_length * length
    else:
        reward = w.format_penalty
    return {
        "reward": float(reward),
        "format_ok": float(ok),
        "correctness": float(correctness),
        "em": em,
        "f1": f,
        "call_validity": float(validity),
        "grounded": ground,
        "not_contradicted": not_contra,
        "consistency": float(consistency),
        "length": length,
    }
