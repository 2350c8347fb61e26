"""A small Qwen2.5-shaped tokenizer for `mtr demo`, trained offline on the synthetic world's text.

Same pipeline as Qwen2.5 (NFC normaliser, Qwen's split regex then byte-level BPE, byte-level
decoder), same special tokens and the official Qwen2.5 chat template, so `apply_chat_template`,
`save_pretrained` and `AutoTokenizer.from_pretrained` behave as with the real tokenizer, only with
a vocabulary of ~1-2k instead of 151k (a tiny model's embedding stays tiny). Byte-level BPE has
the full 256-byte alphabet, so any text round-trips even if it never appeared in training.
"""

from __future__ import annotations

import importlib.resources
import json
import pathlib

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from mtr_jax.errors import MtrError

# Qwen2's pre-tokenizer regex (transformers/models/qwen2/tokenization_qwen2.py, Qwen2.5 tokenizer.json).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]  # special: skipped by decode(skip_special_tokens=True)
# Trace tags: added (non-special) tokens, each one id, kept by decode like Qwen2.5's <tool_call>.
TAG_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<answer>", "</answer>", "<tool_response>", "</tool_response>"]

# Boilerplate the chat template and the trace grammar emit, so it tokenizes compactly.
_BOILERPLATE = [
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>',
    'system\nuser\nassistant\n',
    '\n<tool_call>\n{"name": "search", "arguments": {"query": "Kalem Vost"}}\n</tool_call>',
    '\n<tool_response>\n{"results": [{"title": "Kalem Vost", "text": "Kalem Vost was born in Ulrath."}]}\n</tool_response>',
    '{"type": "function", "function": {"name": "search", "description": "Search the knowledge base.", '
    '"parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "What to look up."}}, '
    '"required": ["query"]}, "returns": {"type": "object", "properties": {"results": {"type": "array", '
    '"items": {"type": "string"}}, "error": {"type": "string"}}}}}',
    "<think>I need to find the answer.</think>\n<answer>yes</answer> <answer>no</answer>",
]


def chat_template() -> str:
    """The official Qwen2.5 chat template shipped in mtr_jax/assets."""
    return importlib.resources.files("mtr_jax").joinpath("assets/qwen2.5_chat_template.jinja").read_text()


def _pipeline(tok: Tokenizer) -> Tokenizer:
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_demo_tokenizer(texts, vocab_size: int = 1536, out_dir: str | pathlib.Path | None = None, boilerplate: bool = True):
    """Train a byte-level BPE on `texts` and wrap it as a `transformers.PreTrainedTokenizerFast`.

    `vocab_size` counts the BPE vocabulary (256 byte symbols + merges); the 3 special and 8 tag
    tokens are appended after it, as in Qwen2.5, so `len(tokenizer) == vocab_size + 11` at most.
    pad = <|endoftext|>, eos = <|im_end|>; chat template = Qwen2.5's. Deterministic for the same
    inputs. With `out_dir`, also `save_pretrained(out_dir)`.
    """
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if isinstance(t, str) and t]
    if not texts:
        raise MtrError("train_demo_tokenizer: no training text")
    if not 256 < vocab_size <= 65536:
        raise MtrError(f"train_demo_tokenizer: vocab_size must be in (256, 65536], got {vocab_size}")
    if boilerplate:
        texts = texts + _BOILERPLATE
    tok = _pipeline(Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False)))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Tags must not be split into merges by training: they become whole added tokens below.
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        bos_token=None,
        unk_token=None,
        extra_special_tokens=[IM_START, IM_END],  # as Qwen2.5's additional_special_tokens
        clean_up_tokenization_spaces=False,
        add_prefix_space=False,
        model_max_length=32768,
        chat_template=chat_template(),
    )
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
    return hf


def demo_tokenizer_for_world(world, vocab_size: int = 1536, extra_texts=(), out_dir=None):
    """The demo tokenizer trained on a synthetic world's pages and questions (+ `extra_texts`,
    e.g. the tool definitions as JSON so the prompt tokenizes compactly)."""
    extra = [t if isinstance(t, str) else json.dumps(t) for t in extra_texts]
    return train_demo_tokenizer(world.texts() + extra, vocab_size=vocab_size, out_dir=out_dir)
