"""One LLM interface for the three model-backed roles (ToolMaker, AutoAgent teacher, ToolActor).

    llm.chat(conversations, schemas=None, max_tokens=None) -> [str | LLMError, ...]

A batch of chat conversations (OpenAI-style message lists) in, one reply text (or the error that
stopped it) per conversation out, in order; `schemas[i]` (a JSON Schema or None) is what reply i
must satisfy. A failure spoils its own conversation only. Backends:

- `LocalLLM` (llm/local.py): any model `load_hf` accepts, through our jitted sampler, batched;
  with a schema, decoding is constrained by llguidance token masks (valid by construction).
- `OpenAIChat` (llm/http.py): any OpenAI-compatible `/v1/chat/completions` through the `openai`
  SDK: async with bounded concurrency, timeouts, retries honouring Retry-After, `response_format`
  when the server supports structured outputs.

`make_llm(tools_cfg)` picks one from the config (`tools.base_url` set -> HTTP, else the local
`tools.llm` model) and keeps it for the process, so roles share one loaded model.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from mtr_jax.errors import MtrError


class LLMError(Exception):
    """Why a conversation got no reply."""


class TransientError(LLMError):
    """Worth retrying: HTTP 5xx/429, timeouts, connection errors, unreadable or empty responses."""


class BackendError(LLMError):
    """Not worth retrying (HTTP 400/401/404, a prompt longer than the model's context)."""


class LLM(Protocol):
    name: str  # identifies the backend in cache keys and logs

    def chat(self, conversations: Sequence[list[dict]], schemas: Sequence[dict | None] | None = None,
             max_tokens: int | None = None) -> list:
        ...


def complete(llm: LLM, prompt: str, schema: dict | None = None) -> str:
    """One user prompt -> its reply text; raises the LLMError that stopped it."""
    out = llm.chat([[{"role": "user", "content": prompt}]], [schema])[0]
    if isinstance(out, Exception):
        raise out
    return out


_SHARED: dict = {}


def make_llm(tools_cfg) -> LLM:
    """The configured LLM (HTTP when `tools.base_url` is set, else the local `tools.llm` model),
    built once per process and configuration."""
    if tools_cfg.base_url:
        from mtr_jax.llm.http import OpenAIChat

        key = ("http", tools_cfg.base_url, tools_cfg.model_name, tools_cfg.structured_outputs, tools_cfg.concurrency,
               tools_cfg.timeout_s, tools_cfg.http_retries, tools_cfg.max_tokens, tools_cfg.http_log)
        if key not in _SHARED:
            _SHARED[key] = OpenAIChat.from_config(tools_cfg)
        return _SHARED[key]
    if not tools_cfg.llm:
        raise MtrError("an llm tool role needs a model: set tools.llm (a local model spec, e.g. "
                       "offline:qwen2.5-coder-0.5b-instruct) or tools.base_url (an OpenAI-compatible endpoint)")
    from mtr_jax.llm.local import LocalLLM

    key = ("local", tools_cfg.llm, tools_cfg.llm_dtype, tools_cfg.llm_max_len, tools_cfg.llm_batch,
           tools_cfg.constrained, tools_cfg.max_tokens)
    if key not in _SHARED:
        _SHARED[key] = LocalLLM.from_config(tools_cfg)
    return _SHARED[key]


class FnLLM:
    """A Python function `prompt -> text` as an LLM: each conversation is rendered as its message
    contents joined by blank lines. For tests (fault injection) and quick custom backends."""

    def __init__(self, fn, name: str = "fn"):
        self.fn, self.name = fn, name

    def chat(self, conversations, schemas=None, max_tokens=None) -> list:
        out = []
        for conv in conversations:
            try:
                out.append(self.fn("\n\n".join(str(m.get("content", "")) for m in conv)))
            except LLMError as e:
                out.append(e)
            except Exception as e:  # a failing hook spoils its own conversation only
                out.append(TransientError(f"the model failed ({type(e).__name__})"))
        return out


def as_llm(model) -> "LLM | None":
    """An LLM, or a `prompt -> text` callable wrapped as one (None stays None)."""
    if model is None or hasattr(model, "chat"):
        return model
    if callable(model):
        return FnLLM(model)
    raise MtrError(f"expected an LLM (with .chat) or a prompt -> text callable, got {type(model).__name__}")
