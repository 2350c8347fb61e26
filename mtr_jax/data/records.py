"""The one record type every QA loader produces and every later stage consumes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class Paragraph:
    title: str
    sentences: list[str]
    is_supporting: bool = False

    @property
    def text(self) -> str:
        return " ".join(s.strip() for s in self.sentences if s.strip())


@dataclass
class QARecord:
    id: str
    question: str
    golds: list[str]  # the answer first, then aliases
    dataset: str
    type: str = ""  # bridge | comparison | compositional | inference | yes-no | ... (dataset's own label)
    context: list[Paragraph] = field(default_factory=list)
    supporting: list[tuple[str, int]] = field(default_factory=list)  # (title, sentence index)
    decomposition: list[dict] = field(default_factory=list)  # MuSiQue: [{"question", "answer", "paragraph_support_idx"}]
    evidences: list[list[str]] = field(default_factory=list)  # 2Wiki: [subject, relation, object]

    @property
    def answer(self) -> str:
        return self.golds[0] if self.golds else ""

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["supporting"] = [list(s) for s in self.supporting]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "QARecord":
        d = dict(d)
        d["context"] = [Paragraph(**p) for p in d.get("context", [])]
        d["supporting"] = [tuple(s) for s in d.get("supporting", [])]
        return cls(**d)
