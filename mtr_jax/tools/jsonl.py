"""One JSON object a line, read strictly: the reader behind `tools.corpus` (corpus.CorpusBackend) and
`data.tools` (toolmaker.read_tools_file), so both stop with the file and line of the first bad one."""

from __future__ import annotations

import json
from typing import Any, Callable, TypeVar

from mtr_jax import paths
from mtr_jax.errors import MtrError

T = TypeVar("T")


def read_jsonl(path, parse: Callable[[Any], T], *, key: str, expected: str, hint: str = "") -> list[T]:
    """`parse` of each non-blank line's JSON value. MtrError "<key>: file not found: <path><hint>" for a
    missing file; "<path> line <i>: expected <expected>" when a line is not JSON or `parse` raises
    ValueError, KeyError or TypeError on it."""
    p = paths.path(path)  # local or gs://
    if not paths.exists(p):
        raise MtrError(f"{key}: file not found: {p}{hint}")
    out = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(parse(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                raise MtrError(f"{p} line {i}: expected {expected}") from None
    return out
