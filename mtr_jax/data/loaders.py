"""Multi-hop QA benchmarks -> `QARecord`: HotpotQA, MuSiQue, 2WikiMultiHopQA, Bamboogle.

    load_records(name, path=None, split="dev", limit=0, on_error="raise", stats=None) -> list[QARecord]

`path` is one of
- a file: `.jsonl` (one record a line), `.json` (a list, `{"data": [...]}`, or JSONL named .json),
  `.csv` (a header with question/answer columns; optional id);
- a directory: the one file in it whose name contains the split (`dev.jsonl`, `hotpot_dev_distractor_v1.json`);
- `tfds:DATA_DIR`: the TFDS dataset prepared there by `mtr_jax.data.tfds_builder.prepare_tfds`;
- None: download `<name>/<split>.jsonl` from the Hugging Face hub dataset FlashRAG uses
  (`RUC-NLPIR/FlashRAG_datasets`); needs network, never used in tests.

Formats are recognised per record, so every dataset reads both its original release and the
FlashRAG JSONL (`id, question, golden_answers[, metadata]`) that FlashRAG / Search-R1 users have:
- HotpotQA: Hugging Face rows (`id`, context `{title: [...], sentences: [[...]]}`, supporting_facts
  `{title, sent_id}`) and the original release (`_id`, context `[[title, [sentences]]]`,
  supporting_facts `[[title, sent_id]]`) give identical records.
- MuSiQue: golds = answer + answer_aliases; paragraphs (one "sentence" each, `is_supporting`);
  supporting = (title, 0) per supporting paragraph; decomposition; type = hop label of the id ("2hop").
- 2WikiMultiHopQA: context and supporting facts as HotpotQA, `evidences` [[subject, relation, object]].
- Bamboogle: FlashRAG JSONL or the original CSV (`Question,Answer`); it has only a test split,
  so split "dev" means "test" (ids `test_<row>` as FlashRAG numbers them).

Bad input raises `MtrError` naming file and line (or record index for a JSON list). With
`on_error="skip"` malformed records are skipped and counted in `stats` (a `LoadStats`); a missing
file, an unknown dataset name or an unreadable source always raise.
"""

from __future__ import annotations

import csv
import json
import pathlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from mtr_jax.data.records import Paragraph, QARecord
from mtr_jax import paths
from mtr_jax.errors import MtrError

DATASETS = ("hotpotqa", "musique", "2wikimultihopqa", "bamboogle")
_ALIASES = {
    "hotpot_qa": "hotpotqa", "hotpot": "hotpotqa", "2wiki": "2wikimultihopqa", "2wikimqa": "2wikimultihopqa",
    "2wikimultihop": "2wikimultihopqa", "2wiki_multihop_qa": "2wikimultihopqa", "musique_ans": "musique",
    "musique-ans": "musique",
}
HUB_REPO = "RUC-NLPIR/FlashRAG_datasets"


@dataclass
class LoadStats:
    read: int = 0  # records seen (good + bad)
    loaded: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)  # reason -> count
    examples: list[str] = field(default_factory=list)  # first few "file:line: reason"


class _Bad(Exception):
    """A malformed record; the caller adds where it was."""


def canonical_name(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise MtrError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)})")
    return key


def canonical_split(name: str, split: str) -> str:
    if name == "bamboogle" and split in ("dev", "validation"):
        return "test"  # Bamboogle has only a test split; everyone evaluates on it
    return split


# ---------------------------------------------------------------------------------------------
# One raw record -> QARecord.


def _text(row: dict, *keys: str) -> str:
    for k in keys:
        v = row.get(k)
        if isinstance(v, str) and v.strip():
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
    raise _Bad(f"no {keys[0]}")


def _golds(row: dict) -> list[str]:
    raw: list = []
    if "golden_answers" in row:
        ga = row["golden_answers"]
        raw += ga if isinstance(ga, list) else [ga]
    for k in ("answer", "Answer"):
        if k in row:
            raw.append(row[k])
    aliases = row.get("answer_aliases") or []
    raw += aliases if isinstance(aliases, list) else [aliases]
    out: list[str] = []
    for g in raw:
        if isinstance(g, (int, float)) and not isinstance(g, bool):
            g = str(g)
        if isinstance(g, str) and g.strip() and g not in out:
            out.append(g)
    if not out:
        raise _Bad("no answer")
    return out


def _pairs(obj, a: str, b: str, what: str) -> list[tuple]:
    """[[x, y], ...] (original releases) or {a: [x...], b: [y...]} (Hugging Face rows) -> [(x, y)]."""
    if obj is None:
        return []
    if isinstance(obj, dict):
        xs, ys = obj.get(a), obj.get(b)
        if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) != len(ys):
            raise _Bad(f"bad {what}")
        return list(zip(xs, ys))
    if isinstance(obj, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in obj):
        return [tuple(p) for p in obj]
    raise _Bad(f"bad {what}")


def _titled_context(row: dict) -> tuple[list[Paragraph], list[tuple[str, int]]]:
    supporting = [(str(t), int(i)) for t, i in _pairs(row.get("supporting_facts"), "title", "sent_id", "supporting_facts")]
    sup_titles = {t for t, _ in supporting}
    context = []
    for title, sents in _pairs(row.get("context"), "title", "sentences", "context"):
        if not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
            raise _Bad("bad context sentences")
        context.append(Paragraph(str(title), list(sents), str(title) in sup_titles))
    return context, supporting


def _hotpot_like(row: dict, dataset: str) -> QARecord:
    context, supporting = _titled_context(row)
    evidences = row.get("evidences") or []
    return QARecord(
        id=_text(row, "_id", "id"), question=_text(row, "question"), golds=_golds(row), dataset=dataset,
        type=str(row.get("type") or ""), context=context, supporting=supporting,
        evidences=[[str(x) for x in e] for e in evidences if isinstance(e, list)],
    )


def _musique(row: dict) -> QARecord:
    rid = _text(row, "id")
    context, supporting = [], []
    for p in row.get("paragraphs") or []:
        if not isinstance(p, dict) or not isinstance(p.get("paragraph_text"), str):
            raise _Bad("bad paragraphs")
        title, sup = str(p.get("title", "")), bool(p.get("is_supporting", False))
        context.append(Paragraph(title, [p["paragraph_text"]], sup))
        if sup:
            supporting.append((title, 0))
    decomposition = [
        {"question": d.get("question", ""), "answer": d.get("answer", ""), "paragraph_support_idx": d.get("paragraph_support_idx")}
        for d in row.get("question_decomposition") or [] if isinstance(d, dict)
    ]
    return QARecord(
        id=rid, question=_text(row, "question"), golds=_golds(row), dataset="musique",
        type=rid.split("__")[0] if "__" in rid else "", context=context, supporting=supporting,
        decomposition=decomposition,
    )


def _flashrag(row: dict, dataset: str) -> QARecord:
    """FlashRAG JSONL: id, question, golden_answers, and optionally the original fields in metadata."""
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    merged = {**meta, "id": row.get("id"), "question": row.get("question"), "answer": None,
              "answer_aliases": None, "golden_answers": row.get("golden_answers")}
    if dataset == "musique" and "paragraphs" in meta:
        return _musique(merged)
    if "context" in meta:
        return _hotpot_like(merged, dataset)
    return QARecord(id=_text(merged, "id"), question=_text(merged, "question"), golds=_golds(merged),
                    dataset=dataset, type=str(meta.get("type") or ""))


def to_record(name: str, row) -> QARecord:
    """One raw record of dataset `name` (any supported format) -> QARecord; raises _Bad."""
    if not isinstance(row, dict):
        raise _Bad("not a JSON object")
    if "golden_answers" in row:
        return _flashrag(row, name)
    if name == "musique":
        return _musique(row)
    if name == "bamboogle":
        return QARecord(id=_text(row, "id", "_id"), question=_text(row, "question", "Question"), golds=_golds(row),
                        dataset="bamboogle")
    return _hotpot_like(row, name)


# ---------------------------------------------------------------------------------------------
# Sources: (where, raw record) pairs.


def _read_jsonl(p: pathlib.Path) -> Iterator[tuple[str, object]]:
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{p}:{i}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{p}:{i}", _Bad(f"invalid JSON ({e.msg})")


def _read_json(p: pathlib.Path) -> Iterator[tuple[str, object]]:
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        yield from _read_jsonl(p)  # JSONL saved as .json
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise MtrError(f"{p}: expected a JSON list of records (or {{\"data\": [...]}})")
    for i, row in enumerate(data):
        yield f"{p}: record {i}", row


def _read_csv(p: pathlib.Path, split: str) -> Iterator[tuple[str, object]]:
    with p.open(encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheet exports start with a BOM
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in reader.fieldnames or [] if c}
        if "question" not in cols or not ({"answer", "golden_answers"} & cols.keys()):
            raise MtrError(f"{p}: CSV header needs 'question' and 'answer' columns, got {reader.fieldnames}")
        for i, raw in enumerate(reader):
            row = {"id": (raw.get(cols["id"]) or "").strip() if "id" in cols else "",
                   "question": raw.get(cols["question"]) or "",
                   "answer": raw.get(cols.get("answer") or cols["golden_answers"]) or ""}
            row["id"] = row["id"] or f"{split}_{i}"
            yield f"{p}:{reader.line_num}", row


def _pick_file(d: pathlib.Path, split: str) -> pathlib.Path:
    files = sorted(q for q in d.iterdir() if q.is_file() and q.suffix in (".jsonl", ".json", ".csv"))
    exact = [q for q in files if q.stem == split]
    if len(exact) == 1:
        return exact[0]
    named = [q for q in files if split in q.stem]
    if len(named) == 1:
        return named[0]
    if not named:
        raise MtrError(f"{d}: no .jsonl/.json/.csv file for split '{split}' (files: {[q.name for q in files]})")
    raise MtrError(f"{d}: several files for split '{split}' ({[q.name for q in named]}); pass one file")


def _hub_file(name: str, split: str) -> pathlib.Path:
    try:
        from huggingface_hub import hf_hub_download

        return pathlib.Path(hf_hub_download(HUB_REPO, f"{name}/{split}.jsonl", repo_type="dataset"))
    except Exception as e:  # offline, not found, auth: all are "cannot get the data"
        raise MtrError(
            f"cannot fetch {name}/{split}.jsonl from the Hugging Face hub ({HUB_REPO}): {type(e).__name__}; "
            "pass a local path to the dataset file"
        ) from None


def iter_raw(name: str, path: str | None, split: str) -> Iterator[tuple[str, object]]:
    """(where, raw record | _Bad | QARecord (tfds, converted at prepare time)) pairs of one source."""
    if path is not None and str(path).startswith("tfds:"):
        from mtr_jax.data.tfds_builder import read_tfds

        yield from read_tfds(name, str(path)[len("tfds:"):], split)
        return
    if path is not None and paths.is_remote(path):  # gs://: read from a local copy (csv/json readers take files)
        path = paths.localize(path)
    p = _hub_file(name, split) if path is None else pathlib.Path(path).expanduser()
    if not p.exists():
        raise MtrError(f"dataset file not found: {p}")
    if p.is_dir():
        p = _pick_file(p, split)
    if p.suffix == ".csv":
        yield from _read_csv(p, split)
    elif p.suffix == ".json":
        yield from _read_json(p)
    else:
        yield from _read_jsonl(p)


def load_records(
    name: str,
    path: str | None = None,
    split: str = "dev",
    limit: int = 0,
    on_error: str = "raise",
    stats: LoadStats | None = None,
) -> list[QARecord]:
    """Read one dataset split into QARecords (see the module docstring). `limit` 0 = all."""
    if on_error not in ("raise", "skip"):
        raise MtrError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    name = canonical_name(name)
    split = canonical_split(name, split)
    stats = stats if stats is not None else LoadStats()
    out: list[QARecord] = []
    seen: set[str] = set()
    for where, row in iter_raw(name, path, split):
        if limit and len(out) >= limit:
            break
        stats.read += 1
        try:
            if isinstance(row, _Bad):
                raise row
            rec = row if isinstance(row, QARecord) else to_record(name, row)
            if rec.id in seen:
                raise _Bad(f"duplicate id {rec.id!r}")
        except _Bad as e:
            if on_error == "raise":
                raise MtrError(f"{where}: {e} ({name})") from None
            stats.skipped += 1
            stats.reasons[str(e).split(" '")[0]] += 1
            if len(stats.examples) < 10:
                stats.examples.append(f"{where}: {e}")
            continue
        seen.add(rec.id)
        out.append(rec)
    stats.loaded += len(out)
    return out
