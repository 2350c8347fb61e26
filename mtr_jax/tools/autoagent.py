"""AutoAgent: writes complete traces (think -> tool call -> observation)* -> answer for SFT.

    AutoAgent(backend="oracle"|"llm", actor=ToolActor(...)).make_trace(record, tools) -> (trace | None, reason)

- oracle (offline): plans from the dataset's own annotations, gets every observation from the
  ToolActor, and writes short <think> steps.
    HotpotQA: search the question (or, for a `keyword_query_rate` share of each batch's records,
              stratified per question template, its keywords; the first <think> is SEARCH_THINK,
              or BRIEF_THINK for a `brief_think_rate` share, stratified the same way),
              then look up each supporting page not yet seen.
    MuSiQue: one search per decomposition step (#k replaced by earlier answers), lookup as fallback.
    2Wiki: one search per evidence triple (lookup as fallback); `compare` on the two dates/numbers
           of a comparison question when the tool set has it.
    Otherwise: search the question.
  Grounding rule: the oracle answers with a gold alias only if it occurs (normalised, whole tokens)
  in one of its observations; yes/no answers are exempt.
- llm: a teacher model (mtr_jax.llm: local or HTTP) writes each assistant turn; its calls are
  answered by the ToolActor; malformed turns reject the trace. `make_traces` runs a batch of
  records in lockstep: one teacher request per live episode per turn, one ToolActor batch per turn.
Kept only if the final answer passes `keep_metric` (em | f1 via mtr_jax.rewards) >= keep_threshold.
Trace JSON is the shared format (see traces.render): {"id", "dataset", "question", "golds", "tools",
"messages", "answer"}.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from mtr_jax import rewards
from mtr_jax.data.records import QARecord
from mtr_jax import paths
from mtr_jax.errors import MtrError
from mtr_jax.llm import as_llm
from mtr_jax.tools.schema import for_template
from mtr_jax.tools.toolactor import ToolActor
from mtr_jax.traces.parse import parse_turn
from mtr_jax.traces.render import SYSTEM_PROMPT, build_messages, observation_text

_YES_NO = {"yes", "no"}
# the oracle's first <think> on a HotpotQA-shaped record, and the brief one of `brief_think_rate`
SEARCH_THINK = "I will search for the key facts in the question."
BRIEF_THINK = "Search first."
# what a keyword query leaves out of a question: question words and function words
_QUERY_STOP = frozenset(
    "a an the in on of at to for by from with which what where who whom whose when how was is were are be been "
    "did does do".split())


def keyword_query(question: str) -> str:
    """The question as a keyword query ("Where was the director of X born?" -> "director X born");
    the question itself if nothing is left."""
    words = [w for w in re.findall(r"[\w'-]+", question) if w.lower() not in _QUERY_STOP]
    return " ".join(words) or question


def _share(record_id: str) -> float:
    """A fixed number in [0, 1) per record id: the same traces on every run and machine."""
    return int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "big") / 2.0 ** 64


def question_template(question: str) -> str:
    """The question without its names (capitalised words after the first), lowercased:
    "Where was the director of Quiet Harbor born?" -> "where was the director of born"."""
    words = re.findall(r"[\w'-]+", question)
    return " ".join(w.lower() for i, w in enumerate(words) if i == 0 or not w[:1].isupper())


def keyword_ids(records: list[QARecord], rate: float, salt: str = "") -> set[str]:
    """The ids of the records whose first search is keywords. Stratified: within each question
    template, floor(rate * n + u) of its n records (u in [0, 1) fixed by the template's ids, so the
    expected share is `rate`), taken in a fixed per-id order. A per-record coin would leave a kind
    of question with few or none by chance (2026-12-07: 5 of 21 for one kind at rate 0.4), and a
    model fine-tuned on the traces then never tries keywords on that kind. `salt` draws another
    fixed order (brief thinks are not the keyword records)."""
    groups: dict[str, list[str]] = {}
    for r in records:
        groups.setdefault(question_template(r.question), []).append(r.id)
    out: set[str] = set()
    for ids in groups.values():
        ids = sorted(set(ids), key=lambda i: _share(salt + i))
        out.update(ids[: int(rate * len(ids) + _share(salt + "|".join(sorted(ids))))])
    return out


def _clip(s: str, n: int = 160) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3].rstrip() + "..."


def _norm(s: str) -> str:
    return rewards.normalize_answer(s)


class _Episode:
    """Messages and observations of one trace being written."""

    def __init__(self, agent: "AutoAgent", record: QARecord, tools: list[dict]):
        self.agent, self.record, self.tools = agent, record, tools
        self.names = {t["function"]["name"] for t in tools}
        self.messages = build_messages(record.question)
        self.obs_texts: list[str] = []
        self.obs_dicts: list[dict] = []
        self.errors = 0

    def call(self, think: str, name: str, arguments: dict):
        """A generator: yields the call, is sent its Observation (the driver batches the calls of
        all episodes in a turn), returns the observation's content."""
        self.messages.append({
            "role": "assistant",
            "content": f"<think>{think}</think>",
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}],
        })
        obs = yield {"name": name, "arguments": arguments}
        text = observation_text(obs.content)
        self.messages.append({"role": "tool", "name": name, "content": text})
        self.obs_texts.append(text)
        self.obs_dicts.append(obs.content)
        self.errors += int(not obs.ok)
        return obs.content

    @property
    def n_calls(self) -> int:
        return len(self.obs_texts)

    def seen(self, text: str) -> bool:
        return bool(rewards.grounded(text, self.obs_texts, threshold=1.0))

    def seen_title(self, title: str) -> bool:
        t = _norm(title)
        return any(_norm(r.get("title", "")) == t for o in self.obs_dicts for r in o.get("results", []) if isinstance(r, dict))

    def evidence_for(self, answer: str) -> str:
        """The retrieved passage that contains the answer (for the final <think>)."""
        for o in self.obs_dicts:
            for r in o.get("results", []) if isinstance(o, dict) else []:
                if isinstance(r, dict) and rewards.grounded(answer, [r.get("text", "")], threshold=1.0):
                    sents = re.split(r"(?<=[.!?])\s+", r.get("text", ""))
                    hit = next((s for s in sents if rewards.grounded(answer, [s], threshold=1.0)), r.get("text", ""))
                    return f"{r.get('title', '')}: {_clip(hit)}"
        return ""


class AutoAgent:
    def __init__(
        self,
        backend: str = "oracle",
        actor: ToolActor | None = None,
        *,
        complete=None,
        keep_metric: str = "em",
        keep_threshold: float = 1.0,
        max_calls: int = 6,
        max_tokens: int = 384,
        keyword_query_rate: float = 0.0,
        brief_think_rate: float = 0.0,
    ):
        if backend not in ("oracle", "llm"):
            raise MtrError(f"tools.autoagent: unknown backend {backend!r} (oracle | llm)")
        if backend == "llm" and complete is None:
            raise MtrError("tools.autoagent=llm needs a teacher: set tools.llm (a local model) or tools.base_url")
        if keep_metric not in ("em", "f1"):
            raise MtrError(f"tools.keep_metric must be em or f1, got {keep_metric!r}")
        self.backend, self.llm = backend, as_llm(complete)
        self.max_tokens = int(max_tokens)  # one teacher turn
        self.actor = actor if actor is not None else ToolActor("corpus")
        self.keep_metric, self.keep_threshold, self.max_calls = keep_metric, keep_threshold, max_calls
        if not 0.0 <= keyword_query_rate <= 1.0:
            raise MtrError(f"tools.keyword_query_rate must be in [0, 1], got {keyword_query_rate!r}")
        # oracle: the share of records whose first search is the question's keywords, not the whole
        # question (stratified per question template, see keyword_ids): traces that vary the way a
        # human's or a model's queries do
        self.keyword_query_rate = float(keyword_query_rate)
        self._keyword_ids: set[str] = set()
        if not 0.0 <= brief_think_rate <= 1.0:
            raise MtrError(f"tools.brief_think_rate must be in [0, 1], got {brief_think_rate!r}")
        # oracle: the share of records (stratified per template, another fixed order) whose first
        # <think> is BRIEF_THINK instead of SEARCH_THINK: a teacher whose thinking varies in length,
        # so a policy sampled from the SFT model tries both, and a turn budget can tell them apart
        self.brief_think_rate = float(brief_think_rate)
        self._brief_ids: set[str] = set()

    # -- public -----------------------------------------------------------------------------------

    def make_trace(self, record: QARecord, tools: list[dict]) -> tuple[dict | None, str]:
        """(trace, "") if kept, else (None, reason)."""
        return self.make_traces([record], [tools])[0]

    def make_traces(self, records: list[QARecord], tool_sets: list[list[dict]]) -> list[tuple[dict | None, str]]:
        """make_trace for a batch (the llm teacher answers the batch's episodes together)."""
        out: list = [None] * len(records)
        todo, oracle = [], []
        for i, (record, tools) in enumerate(zip(records, tool_sets)):
            names = {t["function"]["name"] for t in tools}
            if not record.golds:
                out[i] = (None, "no_gold")
            elif self.backend == "llm":
                todo.append(i)
            elif not {"search", "lookup"} <= names:
                out[i] = (None, "no_search_tools")
            else:
                oracle.append(i)
        if oracle:
            for i, res in zip(oracle, self._run_oracle([records[i] for i in oracle], [tool_sets[i] for i in oracle])):
                out[i] = self._keep(records[i], tool_sets[i], *res)
        if todo:
            for i, res in zip(todo, self._teacher([records[i] for i in todo], [tool_sets[i] for i in todo])):
                out[i] = self._keep(records[i], tool_sets[i], *res)
        return out

    def _keep(self, record: QARecord, tools: list[dict], ep, answer: str, reason: str) -> tuple[dict | None, str]:
        if reason:
            return None, reason
        score = (rewards.exact_match if self.keep_metric == "em" else rewards.f1)(answer, record.golds)
        if score < self.keep_threshold:
            return None, "wrong_answer"
        return {
            "id": record.id,
            "dataset": record.dataset,
            "question": record.question,
            "golds": list(record.golds),
            "tools": tools,
            "messages": ep.messages,
            "answer": answer,
        }, ""

    # -- oracle -----------------------------------------------------------------------------------

    def _run_oracle(self, records: list[QARecord], tool_sets: list[list[dict]]) -> list[tuple[_Episode, str, str]]:
        """The episodes' plans run in lockstep: each turn, the pending call of every live episode
        goes to the ToolActor as one batch (one LLM batch for a model-backed actor)."""
        self._keyword_ids = keyword_ids(records, self.keyword_query_rate) if self.keyword_query_rate else set()
        self._brief_ids = keyword_ids(records, self.brief_think_rate, salt="brief/") if self.brief_think_rate else set()
        plans = [self._oracle(r, t) for r, t in zip(records, tool_sets)]
        res: list = [None] * len(plans)
        pending: dict[int, dict] = {}

        def advance(i, obs=None):
            try:
                pending[i] = plans[i].send(obs)
            except StopIteration as stop:
                res[i] = stop.value

        for i in range(len(plans)):
            advance(i)
        while pending:
            ids = sorted(pending)
            calls = [pending.pop(i) for i in ids]
            observations = self.actor.observe_batch([(c, tool_sets[i], records[i]) for i, c in zip(ids, calls)])
            for i, obs in zip(ids, observations):
                advance(i, obs)
        return res

    def _oracle(self, record: QARecord, tools: list[dict]):
        """A generator (see _Episode.call) returning (episode, answer, reject reason)."""
        ep = _Episode(self, record, tools)
        if record.decomposition:
            yield from self._plan_decomposition(ep)
        elif record.evidences:
            yield from self._plan_evidences(ep)
        elif record.supporting:
            yield from self._plan_supporting(ep)
        else:
            yield from ep.call("I will search for the question's key facts.", "search", {"query": _clip(record.question, 300)})
        return self._finish(ep)

    def _plan_supporting(self, ep: _Episode):  # a generator of calls (see _Episode.call)
        r = ep.record
        query = keyword_query(r.question) if r.id in self._keyword_ids else r.question
        think = BRIEF_THINK if r.id in self._brief_ids else SEARCH_THINK
        yield from ep.call(think, "search", {"query": _clip(query, 300)})
        titles = list(dict.fromkeys(t for t, _ in r.supporting))
        for title in titles:
            if ep.n_calls >= self.max_calls:
                break
            sents = [p for p in r.context if p.title == title]
            idx = [i for t, i in r.supporting if t == title]
            got = sents and all(i < len(sents[0].sentences) and ep.seen(sents[0].sentences[i]) for i in idx)
            if got:
                continue
            why = f"The results mention {title}." if ep.seen(title) else f"I also need facts about {title}."
            yield from ep.call(f"{why} I will look it up.", "lookup", {"title": title})

    def _plan_decomposition(self, ep: _Episode):  # a generator of calls (see _Episode.call)
        r = ep.record
        answers: list[str] = []
        for k, step in enumerate(r.decomposition):
            q = str(step.get("question", ""))
            q = re.sub(r"#(\d+)", lambda m: answers[int(m.group(1)) - 1] if 0 < int(m.group(1)) <= len(answers) else m.group(0), q)
            q = " ".join(q.replace(">>", " ").split())
            ans = str(step.get("answer", ""))
            lead = f"Now I know {answers[-1]}. " if answers else ""
            if ep.n_calls < self.max_calls:
                yield from ep.call(f"{lead}Step {k + 1}: {_clip(q, 200)}", "search", {"query": _clip(q, 300)})
            if ans and not ep.seen(ans):
                idx = step.get("paragraph_support_idx")
                if isinstance(idx, int) and 0 <= idx < len(r.context) and ep.n_calls < self.max_calls:
                    title = r.context[idx].title
                    yield from ep.call(f"The search did not settle it. I will look up {title}.", "lookup", {"title": title})
            answers.append(ans)

    def _plan_evidences(self, ep: _Episode):  # a generator of calls (see _Episode.call)
        r = ep.record
        for s, rel, o in (e for e in r.evidences if len(e) == 3):
            if ep.n_calls >= self.max_calls:
                break
            if ep.seen(o):
                continue
            yield from ep.call(f"I need the {rel} of {s}.", "search", {"query": _clip(f"{s} {rel}", 300)})
            if not ep.seen(o) and ep.n_calls < self.max_calls:
                yield from ep.call(f"Not found yet. I will look up {s}.", "lookup", {"title": s})
        triples = [e for e in r.evidences if len(e) == 3]
        if "compare" in ep.names and len(triples) >= 2 and ep.n_calls < self.max_calls:
            (s1, rel1, o1), (s2, rel2, o2) = triples[-2], triples[-1]
            if rel1 == rel2 and s1 != s2 and ep.seen(o1) and ep.seen(o2):
                yield from ep.call(f"{s1}: {rel1} {o1}. {s2}: {rel2} {o2}. I will compare them.", "compare",
                        {"a": _clip(o1, 100), "b": _clip(o2, 100), "relation": "later"})

    def _finish(self, ep: _Episode) -> tuple[_Episode, str, str]:
        golds = ep.record.golds
        if _norm(golds[0]) in _YES_NO:
            answer = golds[0].strip()
            if ep.n_calls == 0 or ep.errors == ep.n_calls:
                return ep, "", "ungrounded"
            final = f"From what I found, the answer is {answer.lower()}."
        else:
            answer = next((g for g in golds if g.strip() and ep.seen(g)), "")
            if not answer:
                return ep, "", "ungrounded"
            evidence = ep.evidence_for(answer)
            compared = next((o for o in reversed(ep.obs_dicts) if isinstance(o.get("result"), bool)), None)
            final = f"{evidence} " if evidence else ""
            if compared is not None and "a" in compared and "b" in compared:  # a simulated compare may name them otherwise
                verb = "is" if compared["result"] else "is not"
                final += f"{compared['a']} {verb} later than {compared['b']}. "
            final += f"So the answer is {answer}."
        ep.messages.append({"role": "assistant", "content": f"<think>{final.strip()}</think>\n<answer>{answer}</answer>"})
        return ep, answer, ""

    # -- LLM teacher ------------------------------------------------------------------------------

    def _teacher(self, records: list[QARecord], tool_sets: list[list[dict]]) -> list[tuple[_Episode, str, str]]:
        eps = [_Episode(self, r, t) for r, t in zip(records, tool_sets)]
        res: list = [None] * len(eps)
        for _ in range(self.max_calls + 1):
            live = [i for i in range(len(eps)) if res[i] is None]
            if not live:
                break
            replies = self.llm.chat([_teacher_conversation(eps[i].messages, tool_sets[i]) for i in live],
                                    max_tokens=self.max_tokens)
            calls = []  # (episode index, call)
            for i, reply in zip(live, replies):
                ep = eps[i]
                if isinstance(reply, Exception):  # a failing teacher rejects this record only
                    res[i] = (ep, "", f"teacher_failed:{type(reply).__name__}")
                    continue
                turn = parse_turn(reply)
                if turn.kind == "error":
                    res[i] = (ep, "", f"teacher_format:{turn.error}")
                    continue
                content = turn.text[: turn.text.index("<tool_call>")].rstrip("\n") if turn.kind == "tool_call" else turn.text.strip()
                if turn.kind == "answer":
                    ep.messages.append({"role": "assistant", "content": content})
                    res[i] = (ep, turn.answer, "")
                    continue
                ep.messages.append({"role": "assistant", "content": content,
                                    "tool_calls": [{"type": "function", "function": c} for c in turn.calls]})
                calls += [(i, c) for c in turn.calls]
            observations = self.actor.observe_batch([(c, tool_sets[i], records[i]) for i, c in calls])
            for (i, c), obs in zip(calls, observations):
                text = observation_text(obs.content)
                eps[i].messages.append({"role": "tool", "name": c["name"], "content": text})
                eps[i].obs_texts.append(text)
                eps[i].obs_dicts.append(obs.content)
        return [r if r is not None else (eps[i], "", "max_turns") for i, r in enumerate(res)]


# one worked turn pair: small teachers follow an example far better than a description
_TEACHER_EXAMPLE = """Reply with one short turn, either a call:
<think>I need the founder of Acme.</think>
<tool_call>
{"name": "search", "arguments": {"query": "Acme founder"}}
</tool_call>
or, once the tool responses hold the answer:
<think>Acme was founded by Jane Roe.</think>
<answer>Jane Roe</answer>"""


def _teacher_conversation(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The episode so far as a plain chat (any server can take it): the system prompt with the
    tools and the call format, the question, then the teacher's turns and the tool responses
    (as user turns in Qwen2.5's <tool_response> format); the teacher writes the next turn."""
    system = "\n".join([SYSTEM_PROMPT, "Tools:"] + [json.dumps(t, ensure_ascii=False) for t in for_template(tools)]
                       + ['Call a tool as <tool_call>\n{"name": <name>, "arguments": {...}}\n</tool_call>.', _TEACHER_EXAMPLE])
    conv = [{"role": "system", "content": system}]
    for m in messages[1:]:
        if m["role"] == "tool":
            text = f"<tool_response>\n{m['content']}\n</tool_response>"
            if conv[-1]["role"] == "user":  # several responses to one turn: one user message
                conv[-1]["content"] += "\n" + text
            else:
                conv.append({"role": "user", "content": text})
            continue
        text = m.get("content", "")
        for c in m.get("tool_calls", []):
            text += "\n<tool_call>\n" + json.dumps(c["function"], ensure_ascii=False) + "\n</tool_call>"
        conv.append({"role": m["role"], "content": text})
    return conv


# ---------------------------------------------------------------------------------------------
# CLI.


def cli(args) -> int:
    from mtr_jax.llm import make_llm
    from mtr_jax.progress import progress
    from mtr_jax.train.setup import check_tools, load_records_from_config, make_toolmaker

    cfg = args.cfg
    records = load_records_from_config(cfg, limit=args.limit)
    out = paths.path(args.out or cfg.data.traces or paths.join(cfg.run.out_dir, "traces.jsonl"))  # local or gs://
    out.parent.mkdir(parents=True, exist_ok=True)
    maker = make_toolmaker(cfg, fallback="template")
    actor = ToolActor.from_config(cfg.tools, cache_path=cfg.tools.cache or paths.join(cfg.run.out_dir, "tool_cache.sqlite"), seed=cfg.run.seed)
    check_tools(actor, maker)  # before any work
    teacher = make_llm(cfg.tools) if cfg.tools.autoagent == "llm" else None
    agent = AutoAgent(cfg.tools.autoagent, actor, complete=teacher, keep_metric=cfg.tools.keep_metric,
                      keep_threshold=cfg.tools.keep_threshold, max_tokens=cfg.tools.max_tokens, max_calls=cfg.tools.max_calls,
                      keyword_query_rate=cfg.tools.keyword_query_rate, brief_think_rate=cfg.tools.brief_think_rate)
    reasons: Counter = Counter()
    kept = 0
    # records per make_traces call: a model-backed teacher or actor answers a turn's batch at once
    batch = max(1, cfg.tools.llm_batch) if teacher is not None or actor.backend != "corpus" else 64
    bar = progress(len(records), desc="make-traces")
    with out.open("w", encoding="utf-8") as f:
        for j in range(0, len(records), batch):
            chunk = records[j: j + batch]
            for trace, reason in agent.make_traces(chunk, [maker.make(r) for r in chunk]):
                if trace is None:
                    reasons[reason] += 1
                    continue
                kept += 1
                f.write(json.dumps(trace, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
    bar.close()
    summary = {"records": len(records), "kept": kept, "rejected": sum(reasons.values()), "reasons": dict(reasons),
               "kept_share": round(kept / max(1, len(records)), 4), "actor": dict(actor.counters), "out": str(out)}
    if actor.cache is not None:
        actor.cache.sync()  # a gs:// tool cache goes home
    print(json.dumps(summary), file=sys.stdout)
    return 0
