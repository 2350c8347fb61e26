"""Synthetic demo world + demo tokenizer.

Oracles: the answers are re-derived from the *text* of the supporting sentences with regexes (not
from the generator's tables); the pre-tokenizer is checked against Qwen2's regex run by the
`regex` module; the chat template output is checked against the literal Qwen2.5 tool-call prompt.
"""

from __future__ import annotations

import json
import re

import pytest

from mtr_jax.data.demo_tokenizer import IM_END, IM_START, PAD, QWEN2_SPLIT_REGEX, TAG_TOKENS, demo_tokenizer_for_world
from mtr_jax.data.records import QARecord
from mtr_jax.data.synthetic import KINDS, entity_names, make_world, split_world
from mtr_jax.errors import MtrError


@pytest.fixture(scope="module")
def world():
    return make_world(seed=7)


@pytest.fixture(scope="module")
def split(world):
    return split_world(world, n_train=300, n_heldout=80, seed=0)


@pytest.fixture(scope="module")
def tok(world, tmp_path_factory):
    return demo_tokenizer_for_world(world, vocab_size=1024, out_dir=tmp_path_factory.mktemp("tok"))


def _sent(rec: QARecord, title: str, idx: int) -> str:
    page = {p.title: p for p in rec.context}[title]
    return page.sentences[idx]


def _read_answer(rec: QARecord) -> str:
    """Answer the question from its supporting sentences' text alone (independent of the generator)."""
    s = [_sent(rec, t, i) for t, i in rec.supporting]
    q = rec.question
    last = lambda pat, text: re.fullmatch(pat, text).group(1)  # noqa: E731
    if q.startswith("Where was the director of") or q.startswith("Where was the founder of"):
        return last(r".* was born in (\D+)\.", s[1])
    if q.startswith("In which year was the director"):
        return last(r".* was born in (\d{4})\.", s[1])
    if q.startswith("Which company does the director"):
        return last(r".* works for (.+)\.", s[1])
    if q.startswith("In which country"):
        return last(r".* is located in (.+)\.", s[1])
    if q.startswith("Who was born first"):
        a, b = re.fullmatch(r"Who was born first, (.+) or (.+)\?", q).groups()
        ya, yb = (int(last(r".* was born in (\d{4})\.", x)) for x in s)
        assert s[0].startswith(a) and s[1].startswith(b)
        return a if ya < yb else b
    if q.startswith("Were "):
        ca, cb = (last(r".* was born in (\D+)\.", x) for x in s)
        return "yes" if ca == cb else "no"
    if q.startswith("Which film was released first"):
        a, b = re.fullmatch(r"Which film was released first, (.+) or (.+)\?", q).groups()
        ya, yb = (int(last(r".* was released in (\d{4})\.", x)) for x in s)
        return a if ya < yb else b
    raise AssertionError(q)


def test_large_world_names_stay_unique():
    """1500 people need more one-syllable surnames than exist: the generator must go longer, not
    loop forever (it did), and every entity name stays unique."""
    w = make_world(seed=0, n_people=1500, n_cities=300, n_films=900, n_companies=240)
    names = [n.lower() for n in (*w.people, *w.cities, *w.films, *w.companies)]
    assert len(names) == 2940 and len(set(names)) == len(names)


def test_world_is_deterministic_per_seed():
    a = [r.to_json() for r in make_world(3).questions(40)]
    b = [r.to_json() for r in make_world(3).questions(40)]
    c = [r.to_json() for r in make_world(4).questions(40)]
    assert a == b
    assert a != c


def test_records_have_valid_supporting_facts_and_answers(split):
    for rec in split[0] + split[1]:
        assert rec.dataset == "synthetic" and rec.type in ("bridge", "comparison") and rec.golds
        titles = [p.title for p in rec.context]
        assert len(titles) == len(set(titles))
        sup_titles = {t for t, _ in rec.supporting}
        assert 4 <= len(rec.context) <= 6 and len(rec.context) - len(sup_titles) == 3  # 3 distractors
        for p in rec.context:
            assert p.is_supporting == (p.title in sup_titles)
            assert all(s.endswith(".") and len(s.split()) <= 10 for s in p.sentences)
        for t, i in rec.supporting:
            assert 0 <= i < len({p.title: p for p in rec.context}[t].sentences)
        assert _read_answer(rec) == rec.golds[0], rec.question
        assert QARecord.from_json(json.loads(json.dumps(rec.to_json()))) == rec


def test_question_mix(split):
    train, held = split
    assert len(train) == 300 and len(held) == 80
    assert len({r.question for r in train}) == 300
    kinds = {k: v[1].split("{")[0] for k, v in KINDS.items()}
    for k, prefix in kinds.items():
        assert any(r.question.startswith(prefix) for r in train), k
    assert {r.golds[0] for r in train if r.question.startswith("Were ")} == {"yes", "no"}


def test_heldout_entities_never_in_training(world, split):
    train, held = split
    train_text = "\n".join(
        [r.question for r in train] + [g for r in train for g in r.golds] + [p.title + " " + p.text for r in train for p in r.context]
    )
    held_entities = set()
    for r in held:
        held_entities |= {t for t, _ in r.supporting}
        held_entities |= {g for g in r.golds if g in entity_names(world)}
        held_entities |= {e for e in entity_names(world, "heldout") if e in r.question}
    assert len(held_entities) > 20
    assert held_entities <= entity_names(world, "heldout")
    for e in held_entities:
        assert re.search(rf"\b{re.escape(e)}\b", train_text) is None, e


def test_bad_world_arguments():
    with pytest.raises(MtrError):
        make_world(0, n_people=3)
    with pytest.raises(MtrError):
        make_world(0).questions(5, part="dev")
    with pytest.raises(MtrError, match="distinct"):
        make_world(0).questions(500, part="heldout", kinds=["person_country"])


def test_tokenizer_round_trip_and_special_tokens(world, tok):
    assert len(tok) <= 1024 + 11
    texts = world.texts()[:50] + ["Ünïcødé ≠ ascii — 東京 🙂\n\ttabs  and   spaces", '{"name": "search", "arguments": {"query": "x"}}']
    for t in texts:
        assert tok.decode(tok.encode(t, add_special_tokens=False)) == t
    for t in [PAD, IM_START, IM_END, *TAG_TOKENS]:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    assert tok.pad_token == PAD and tok.eos_token == IM_END
    ids = tok.encode(f"{IM_START}user\nhi <tool_call>x</tool_call>{IM_END}", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi <tool_call>x</tool_call>"
    # a world name costs few tokens: the BPE learned the world's syllables
    name = next(iter(world.people))
    assert len(tok.encode(" " + name, add_special_tokens=False)) <= 6


def test_pretokenizer_is_qwen2_regex(tok):
    import regex

    text = "Hello world's DON'T 12345  \n\n x?!  end\r\n  東京abc"
    pieces = [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    expect = regex.findall(QWEN2_SPLIT_REGEX, text)
    byte_map = _bytes_to_unicode()
    assert pieces == ["".join(byte_map[b] for b in e.encode("utf-8")) for e in expect]


def _bytes_to_unicode():
    # GPT-2's byte -> printable-char table (the ByteLevel alphabet), written out independently.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


TOOLS = [{"type": "function", "function": {"name": "search", "description": "Search.", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]
MESSAGES = [
    {"role": "user", "content": "Where was the director of Gimgo born?"},
    {"role": "assistant", "content": "<think>Look it up.</think>", "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"query": "Gimgo"}}}]},
    {"role": "tool", "content": "Gimgo is a film."},
]
# The Qwen2.5 prompt for this conversation, written out by hand from the official format.
EXPECTED = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "search", "description": "Search.", "parameters": {"type": "object", '
    '"properties": {"query": {"type": "string"}}, "required": ["query"]}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\nWhere was the director of Gimgo born?<|im_end|>\n"
    '<|im_start|>assistant\n<think>Look it up.</think>\n<tool_call>\n{"name": "search", "arguments": {"query": "Gimgo"}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\nGimgo is a film.\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
)


def test_chat_template_with_tools_and_save_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    text = tok.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert text == EXPECTED
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert tok2.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False, add_generation_prompt=True) == EXPECTED
    assert tok2.encode(EXPECTED, add_special_tokens=False) == tok.encode(EXPECTED, add_special_tokens=False)
    assert (tok2.pad_token_id, tok2.eos_token_id, len(tok2)) == (tok.pad_token_id, tok.eos_token_id, len(tok))


def test_tokenizer_is_deterministic(world, tok):
    again = demo_tokenizer_for_world(world, vocab_size=1024)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
