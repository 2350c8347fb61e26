"""Loaders read each benchmark's real formats (fixtures copied from the public dev sets)."""

import json
import pathlib

import pytest

from mtr_jax.data.loaders import DATASETS, LoadStats, load_records
from mtr_jax.data.records import QARecord
from mtr_jax.errors import MtrError

FIX = pathlib.Path(__file__).parent / "fixtures" / "data"
HP_HF, HP_ORIG = FIX / "hotpotqa" / "hf_rows.jsonl", FIX / "hotpotqa" / "original_format.jsonl"


def raw(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_dataset_names():
    assert DATASETS == ("hotpotqa", "musique", "2wikimultihopqa", "bamboogle")


def test_hotpotqa_hf_rows():
    recs = load_records("hotpotqa", str(HP_HF))
    assert len(recs) == 5 and all(r.dataset == "hotpotqa" for r in recs)
    r = recs[0]
    assert r.id == "5a85fb085542994775f606de" and r.golds == ["Ronald Shusett"] and r.type == "bridge"
    assert r.question.startswith("What is the name of the executive producer")
    assert r.supporting == [("Alien (soundtrack)", 0), ("Alien (film)", 2), ("Alien (film)", 5)]
    assert len(r.context) == 10 and r.context[0].title == "Christus Apollo"
    assert [p.title for p in r.context if p.is_supporting] == ["Alien (soundtrack)", "Alien (film)"]
    # every paragraph is the raw row's, unchanged
    row = raw(HP_HF)[0]
    assert [p.title for p in r.context] == row["context"]["title"]
    assert [p.sentences for p in r.context] == row["context"]["sentences"]


def test_hotpotqa_original_format():
    recs = load_records("hotpotqa", str(HP_ORIG))
    assert len(recs) == 6
    assert [r.golds[0] for r in recs] == ["Monica Lewinsky", "Ronald Shusett", "yes", "no", "Rush", "Spurs"]
    assert [r.type for r in recs] == ["bridge", "bridge", "comparison", "comparison", "bridge", "bridge"]
    r, row = recs[0], raw(HP_ORIG)[0]
    assert r.supporting == [("Their Lives", 0), ("Their Lives", 1), ("Monica Lewinsky", 0)]
    assert [(p.title, p.sentences) for p in r.context] == [tuple(c) for c in row["context"]]
    assert r.context[4].title == "Their Lives" and r.context[4].is_supporting and len(r.context[4].sentences) == 2
    assert len(r.context[0].sentences) == 12


def test_hotpotqa_both_formats_identical():
    hf = {r.id: r for r in load_records("hotpotqa", str(HP_HF))}
    orig = {r.id: r for r in load_records("hotpotqa", str(HP_ORIG))}
    common = sorted(hf.keys() & orig.keys())
    assert common == ["5a85fb085542994775f606de", "5aba5d2e55429901930fa799"]
    for k in common:
        assert hf[k] == orig[k]
        assert json.dumps(hf[k].to_json()) == json.dumps(orig[k].to_json())
        assert QARecord.from_json(hf[k].to_json()) == hf[k]


def test_json_list_and_data_wrapper(tmp_path):
    rows = raw(HP_ORIG)
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    want = load_records("hotpotqa", str(HP_ORIG))
    assert load_records("hotpotqa", str(tmp_path / "list.json")) == want
    assert load_records("hotpotqa", str(tmp_path / "wrapped.json")) == want


def test_flashrag_format_with_metadata(tmp_path):
    rows = raw(HP_HF)
    fr = [{"id": r["id"], "question": r["question"], "golden_answers": [r["answer"]],
           "metadata": {k: r[k] for k in ("type", "level", "supporting_facts", "context")}} for r in rows]
    p = tmp_path / "dev.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in fr))
    assert load_records("hotpotqa", str(p)) == load_records("hotpotqa", str(HP_HF))


def test_musique():
    recs = load_records("musique", str(FIX / "musique"))  # directory: picks dev.jsonl
    assert len(recs) == 5 and [len(r.golds) for r in recs] == [6, 3, 2, 1, 1]
    r = recs[0]
    assert r.id == "2hop__335418_279684" and r.type == "2hop"
    assert r.golds == ["Pittsburgh Pirates", "Orioles", "Pirates", "Baltimore Orioles", "New York Mets", "Mets"]
    assert len(r.context) == 20 and all(len(p.sentences) == 1 for p in r.context)
    assert [p.title for p in r.context if p.is_supporting] == ["Anna Benson", "Kris Benson"]
    assert r.supporting == [("Anna Benson", 0), ("Kris Benson", 0)]
    assert r.decomposition == [
        {"question": "Anna Benson >> spouse", "answer": "Kris Benson", "paragraph_support_idx": 9},
        {"question": "#1 >> member of sports team", "answer": "Pittsburgh Pirates", "paragraph_support_idx": 16},
    ]
    assert r.context[9].title == "Anna Benson" and r.context[9].sentences == [raw(FIX / "musique" / "dev.jsonl")[0]["paragraphs"][9]["paragraph_text"]]


def test_2wikimultihopqa():
    recs = load_records("2wikimultihopqa", str(FIX / "2wikimultihopqa" / "dev.jsonl"))
    assert [r.type for r in recs] == ["compositional", "bridge_comparison", "comparison", "inference", "compositional"]
    r = recs[0]
    assert r.id == "099f34280bda11eba7f7acde48001122" and r.golds == ["Montreal, Quebec"]
    assert r.evidences == [["The Zone", "director", "Denys Desjardins"], ["Denys Desjardins", "place of birth", "Montreal, Quebec"]]
    assert r.supporting == [("The Zone (2017 film)", 0), ("Denys Desjardins", 0)]
    assert len(r.context) == 10 and [p.title for p in r.context if p.is_supporting] == ["The Zone (2017 film)", "Denys Desjardins"]
    assert load_records("2wiki", str(FIX / "2wikimultihopqa"))[1].golds == ["Free Guy"]  # alias name, directory


def test_bamboogle_jsonl_and_csv_agree():
    a = load_records("bamboogle", str(FIX / "bamboogle" / "test.jsonl"))
    b = load_records("bamboogle", str(FIX / "bamboogle" / "test.csv"))
    assert len(a) == 10 and a == b
    assert [r.id for r in a] == [f"test_{i}" for i in range(10)]
    assert a[5].golds == ["April 30, 1789"] and a[0].golds == ["james madison"]
    assert a[2].question == "In what year was the company that was founded as Sound of Music added to the S&P 500?"


def test_limit():
    assert [r.id for r in load_records("bamboogle", str(FIX / "bamboogle" / "test.jsonl"), limit=3)] == ["test_0", "test_1", "test_2"]


def test_tfds_roundtrip(tmp_path):
    from mtr_jax.data.tfds_builder import prepare_tfds

    prepare_tfds("musique", {"dev": str(FIX / "musique" / "dev.jsonl")}, str(tmp_path))
    assert list((tmp_path / "mtr_qa" / "musique" / "1.0.0").glob("*.array_record*"))
    want = load_records("musique", str(FIX / "musique"))
    assert load_records("musique", f"tfds:{tmp_path}", split="dev") == want
    prepare_tfds("musique", {"dev": "/nonexistent"}, str(tmp_path))  # prepared once: not re-read
    with pytest.raises(MtrError, match="no prepared split 'train'"):
        load_records("musique", f"tfds:{tmp_path}", split="train")


def test_hub_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MtrError, match="Hugging Face hub"):
        load_records("bamboogle", None)


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_unknown_dataset():
    with pytest.raises(MtrError, match="unknown dataset 'squad'"):
        load_records("squad", str(HP_HF))


def test_missing_file(tmp_path):
    with pytest.raises(MtrError, match="not found: .*nope.jsonl"):
        load_records("hotpotqa", str(tmp_path / "nope.jsonl"))


def _bad_file(tmp_path):
    rows = raw(FIX / "bamboogle" / "test.jsonl")[:4]
    del rows[1]["question"]
    rows[2]["golden_answers"] = []
    lines = [json.dumps(r) for r in rows] + ["{not json", "[1, 2]", json.dumps(rows[0])]
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_bad_records_raise_with_file_and_line(tmp_path):
    p = _bad_file(tmp_path)
    with pytest.raises(MtrError, match=rf"{p}:2: no question"):
        load_records("bamboogle", str(p))
    q = tmp_path / "noanswer.jsonl"
    q.write_text(json.dumps({"_id": "x", "question": "q?", "context": [], "supporting_facts": []}) + "\n")
    with pytest.raises(MtrError, match=rf"{q}:1: no answer"):
        load_records("hotpotqa", str(q))
    c = tmp_path / "bad.csv"
    c.write_text("Question,Answer\nWho?,Me\n,You\n")
    with pytest.raises(MtrError, match=rf"{c}:3: no question"):
        load_records("bamboogle", str(c))
    h = tmp_path / "header.csv"
    h.write_text("q,a\nWho?,Me\n")
    with pytest.raises(MtrError, match="question"):
        load_records("bamboogle", str(h))


def test_skip_counts_malformed(tmp_path):
    st = LoadStats()
    recs = load_records("bamboogle", str(_bad_file(tmp_path)), on_error="skip", stats=st)
    assert [r.id for r in recs] == ["test_0", "test_3"]
    assert (st.read, st.loaded, st.skipped) == (7, 2, 5)
    assert st.reasons == {"no question": 1, "no answer": 1, "invalid JSON (Expecting property name enclosed in double quotes)": 1,
                          "not a JSON object": 1, "duplicate id": 1}
    assert st.examples[0].endswith("bad.jsonl:2: no question")


def test_directory_ambiguous_or_empty(tmp_path):
    (tmp_path / "dev_a.jsonl").write_text("")
    (tmp_path / "dev_b.jsonl").write_text("")
    with pytest.raises(MtrError, match="several files for split 'dev'"):
        load_records("hotpotqa", str(tmp_path))
    with pytest.raises(MtrError, match="no .jsonl/.json/.csv file for split 'train'"):
        load_records("hotpotqa", str(tmp_path), split="train")


def test_bad_on_error():
    with pytest.raises(MtrError, match="on_error"):
        load_records("hotpotqa", str(HP_HF), on_error="ignore")


def test_csv_with_bom_and_id_column(tmp_path):
    c = tmp_path / "b.csv"
    c.write_bytes("\ufeffid,Question,Answer\nq7,Who?,Me\n".encode("utf-8"))
    (r,) = load_records("bamboogle", str(c))
    assert (r.id, r.question, r.golds) == ("q7", "Who?", ["Me"])
