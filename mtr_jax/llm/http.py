"""The HTTP backend: any OpenAI-compatible `/v1/chat/completions` (vLLM, SGLang, `transformers
serve`, OpenAI) through the official `openai` SDK.

- A batch is sent concurrently (asyncio, at most `concurrency` requests in flight).
- The SDK retries connection errors, timeouts, 408/409/429 and 5xx with exponential backoff and
  honours Retry-After (`max_retries`); what still fails becomes a TransientError for that
  conversation, a 4xx a BackendError.
- `response_format: {"type": "json_schema", ...}` is sent only when the server supports it
  (`tools.structured_outputs`); otherwise the caller validates and retries with the validator's
  message (many servers, `transformers serve` among them, ignore response_format).
- The API key comes from the environment variable named by `tools.api_key_env`, never from the
  config, and is never logged. `tools.http_log` records every request body (the key lives in a
  header, which is not recorded) and its outcome, one JSON line each.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.parse
from typing import Sequence

from mtr_jax.errors import MtrError
from mtr_jax.llm import BackendError, TransientError


class OpenAIChat:
    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 30.0,
                 max_retries: int = 2, concurrency: int = 8, structured_outputs: bool = False, max_tokens: int = 512,
                 temperature: float = 0.0, log_path: str = ""):
        if not base_url:
            raise MtrError("tools.base_url is empty: set an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        if concurrency < 1:
            raise MtrError(f"tools.concurrency={concurrency}: must be >= 1")
        self.model, self.api_key_env, self.timeout_s = model or "default", api_key_env, float(timeout_s)
        self.max_retries, self.concurrency = int(max_retries), int(concurrency)
        self.structured_outputs, self.max_tokens, self.temperature = bool(structured_outputs), int(max_tokens), temperature
        self.log_path = log_path
        self._log_lock = threading.Lock()
        self.name = f"http:{self.model}"
        self.counters = {"requests": 0, "failed": 0}

    @classmethod
    def from_config(cls, t) -> "OpenAIChat":
        return cls(t.base_url, t.model_name, api_key_env=t.api_key_env, timeout_s=t.timeout_s, max_retries=t.http_retries,
                   concurrency=t.concurrency, structured_outputs=t.structured_outputs, max_tokens=t.max_tokens,
                   log_path=t.http_log)

    # ------------------------------------------------------------------------------------------

    def chat(self, conversations: Sequence[list[dict]], schemas: Sequence[dict | None] | None = None,
             max_tokens: int | None = None) -> list:
        if not conversations:
            return []
        schemas = list(schemas) if schemas is not None else [None] * len(conversations)
        coro = self._chat_all(list(conversations), schemas, int(max_tokens or self.max_tokens))
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        out: list = []  # called from inside an event loop (a notebook): run ours in a thread
        t = threading.Thread(target=lambda: out.append(asyncio.run(coro)))
        t.start()
        t.join()
        return out[0]

    def _client(self):
        import openai

        host = urllib.parse.urlparse(self.base_url).hostname or ""
        # a loopback server is reached directly, whatever proxy the environment names
        http_client = openai.DefaultAsyncHttpxClient(trust_env=host not in ("127.0.0.1", "localhost", "::1"))
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=key or "EMPTY", timeout=self.timeout_s,
                                  max_retries=self.max_retries, http_client=http_client)

    async def _chat_all(self, conversations, schemas, max_tokens):
        sem = asyncio.Semaphore(self.concurrency)
        async with self._client() as client:
            return await asyncio.gather(*(self._one(client, sem, c, s, max_tokens) for c, s in zip(conversations, schemas)))

    def _request(self, conversation, schema, max_tokens) -> dict:
        body = {"model": self.model, "messages": conversation, "max_tokens": max_tokens, "temperature": self.temperature}
        if schema is not None and self.structured_outputs:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
        return body

    async def _one(self, client, sem, conversation, schema, max_tokens):
        import openai

        body = self._request(conversation, schema, max_tokens)
        async with sem:
            t0 = time.perf_counter()
            try:
                r = await client.chat.completions.create(**body)
                text = r.choices[0].message.content if r.choices else None
                result = text if isinstance(text, str) and text else TransientError(f"empty reply from {self.base_url}")
            except openai.APIStatusError as e:
                code = e.status_code
                cls = TransientError if code >= 500 or code in (408, 409, 429) else BackendError
                result = cls(f"HTTP {code} from {self.base_url}")
            except (openai.APIConnectionError, openai.APITimeoutError) as e:
                result = TransientError(f"no response from {self.base_url} ({type(e).__name__})")
            except (openai.OpenAIError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
                result = TransientError(f"unreadable response from {self.base_url} ({type(e).__name__})")
            self._record(body, result, time.perf_counter() - t0)
        return result

    def _record(self, body: dict, result, seconds: float) -> None:
        with self._log_lock:
            self.counters["requests"] += 1
            self.counters["failed"] += int(isinstance(result, Exception))
            if not self.log_path:
                return
            line = {"request": body, "ok": not isinstance(result, Exception), "seconds": round(seconds, 3),
                    "error": str(result) if isinstance(result, Exception) else None}
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
