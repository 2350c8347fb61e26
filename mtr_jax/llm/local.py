"""The local backend: a model `load_hf` accepts (the offline Qwen2.5, an HF directory, a GGUF, a
checkpoint) answering chat conversations through our jitted sampler, `batch` at a time.

Without a schema a batch is one `Sampler.generate` (the decode loop inside jit, no Python per
token). With a schema the reply is constrained by llguidance: per token, the host computes each
row's allowed-token bitmask from its grammar state (llguidance's Rust matcher, all rows in
parallel) and the jitted `Sampler.step_masked` takes the best allowed token, so the reply parses
and validates by construction. llguidance rather than xgrammar or outlines-core: it builds the
mask on the fly from the tokenizer's trie (no per-schema precompilation, which matters when every
tool has its own `returns` schema), supports the JSON Schema keywords tool schemas use, and has a
NumPy interface (no torch at run time).
"""

from __future__ import annotations

import copy
import json
import time
from typing import Sequence

import numpy as np

from mtr_jax.errors import MtrError
from mtr_jax.llm import BackendError

# generation-time bounds added to schemas that leave sizes open (a reply valid against the
# tightened schema is valid against the original): a greedy model can otherwise repeat forever
MAX_STRING_CHARS = 200
MAX_ARRAY_ITEMS = 3


def tighten(schema):
    """A copy of `schema` with maxLength on open strings, maxItems on open arrays and no keys
    beyond the declared properties."""
    def walk(s):
        if isinstance(s, list):
            return [walk(x) for x in s]
        if not isinstance(s, dict):
            return s
        out = {k: walk(v) for k, v in s.items()}
        types = out.get("type")
        types = types if isinstance(types, list) else [types]
        if "string" in types and "maxLength" not in out and "enum" not in out and "const" not in out:
            out["maxLength"] = MAX_STRING_CHARS
        if "array" in types and "maxItems" not in out:
            out["maxItems"] = MAX_ARRAY_ITEMS
        if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
            out["additionalProperties"] = False  # no invented keys (of unbounded length)
        return out

    return walk(copy.deepcopy(schema))


class LocalLLM:
    """`params`/`cfg`: a Qwen2 model (from `load_hf_params`); `tokenizer`: its transformers tokenizer
    (with the chat template). `LocalLLM.load(spec)` builds one from any model spec."""

    def __init__(self, params, cfg, tokenizer, *, name: str = "local", max_len: int = 2048, batch: int = 16,
                 constrained: bool = True, max_tokens: int = 512):
        from mtr_jax.sampling import decode
        from mtr_jax.sampling.sampler import Sampler

        self.cfg, self.tokenizer = cfg, tokenizer
        self.max_len, self.batch = int(max_len), max(1, int(batch))
        self.constrained, self.max_tokens = bool(constrained), int(max_tokens)
        # decode over per-layer weights, sliced once here (see decode.unstack_layers)
        self.params = decode.unstack_layers(params) if not isinstance(params["layers"], (list, tuple)) else params
        tok = tokenizer
        eos = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
        self.eos_ids = sorted(i for i in eos if isinstance(i, int) and 0 <= i < cfg.vocab_size)
        self.sampler = Sampler(cfg, cache_len=self.max_len, eos_ids=self.eos_ids, pad_id=tok.pad_token_id or 0,
                               unstack_layers=False)
        self.name = f"llm:{name}"
        self._lltok = None
        self.stats = {"calls": 0, "constrained_tokens": 0, "constrained_s": 0.0, "free_tokens": 0, "free_s": 0.0}

    @classmethod
    def load(cls, spec: str, *, dtype: str = "bfloat16", **kw) -> "LocalLLM":
        from transformers import AutoTokenizer

        from mtr_jax.model import sources
        from mtr_jax.model.hf_io import load_hf_params

        tdir = sources.tokenizer_dir(spec)
        if tdir is None:
            raise MtrError(f"tools.llm: {spec} holds no tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(tdir))
        params, cfg = load_hf_params(spec, dtype=dtype)
        return cls(params, cfg, tokenizer, name=spec, **kw)

    @classmethod
    def from_config(cls, t) -> "LocalLLM":
        return cls.load(t.llm, dtype=t.llm_dtype, max_len=t.llm_max_len, batch=t.llm_batch, constrained=t.constrained,
                        max_tokens=t.max_tokens)

    # ------------------------------------------------------------------------------------------

    def chat(self, conversations: Sequence[list[dict]], schemas: Sequence[dict | None] | None = None,
             max_tokens: int | None = None) -> list:
        n = len(conversations)
        schemas = list(schemas) if schemas is not None else [None] * n
        max_new = int(max_tokens or self.max_tokens)
        out: list = [None] * n
        prompts = []
        for i, conv in enumerate(conversations):
            ids = list(self.tokenizer.apply_chat_template(list(conv), add_generation_prompt=True, tokenize=True,
                                                          return_dict=False))
            if len(ids) + max_new > self.max_len:
                out[i] = BackendError(f"prompt of {len(ids)} tokens + {max_new} new exceeds tools.llm_max_len={self.max_len}")
            prompts.append(ids)
        self.stats["calls"] += n
        free = [i for i in range(n) if out[i] is None and (schemas[i] is None or not self.constrained)]
        bound = [i for i in range(n) if out[i] is None and schemas[i] is not None and self.constrained]
        for group, run in ((free, self._free), (bound, self._constrained)):
            for j in range(0, len(group), self.batch):
                rows = group[j: j + self.batch]
                texts = run([prompts[i] for i in rows], [schemas[i] for i in rows], max_new)
                for i, t in zip(rows, texts):
                    out[i] = t
        return out

    def _text(self, tokens) -> str:
        return self.tokenizer.decode([int(t) for t in tokens if int(t) not in self.eos_ids], skip_special_tokens=True)

    def _free(self, prompts, schemas, max_new) -> list[str]:
        from mtr_jax.sampling.sampler import SamplingParams

        t0 = time.perf_counter()
        state = self.sampler.start(self.params, prompts)
        state, res = self.sampler.generate(self.params, state, max_new_tokens=max_new, sampling=SamplingParams(temperature=0.0),
                                           key=0)
        del state
        self.stats["free_tokens"] += int(res.lengths.sum())
        self.stats["free_s"] += time.perf_counter() - t0
        return [self._text(res.tokens[r, : res.lengths[r]]) for r in range(len(prompts))]

    def _matcher_tokenizer(self):
        if self._lltok is None:
            import llguidance.hf

            self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.cfg.vocab_size,
                                                       eos_token=self.eos_ids[0] if len(self.eos_ids) == 1 else None)
        return self._lltok

    def grammar(self, schema: dict) -> str:
        import llguidance

        return llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(tighten(schema)), defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})

    def _constrained(self, prompts, schemas, max_new) -> list:
        """Greedy decoding under each row's JSON-Schema grammar; a row ends when its grammar is
        complete (then eos is the only allowed token) or at max_new."""
        import llguidance
        import llguidance.numpy as llnp

        t0 = time.perf_counter()
        lltok = self._matcher_tokenizer()
        matchers = []
        for s in schemas:
            m = llguidance.LLMatcher(lltok, self.grammar(s), log_level=0)
            matchers.append(m)
        N = len(prompts)
        out_toks = [[] for _ in range(N)]
        done = np.array([m.is_error() for m in matchers], bool)
        errors = [m.get_error() if m.is_error() else "" for m in matchers]
        state = self.sampler.start(self.params, prompts)
        bits = llnp.allocate_token_bitmask(N, self.cfg.vocab_size)
        executor = llguidance.LLExecutor()
        eos = set(self.eos_ids)
        for step in range(max_new):
            live = [i for i in range(N) if not done[i]]
            if not live:
                break
            llnp.fill_next_token_bitmask_par(executor, [(matchers[i], i) for i in live], bits)
            state, toks = self.sampler.step_masked(self.params, state, bits, ~done, window_hint=max_new - step)
            for i in live:
                t = int(toks[i])
                if t in eos:
                    done[i] = True
                    continue
                if not matchers[i].consume_token(t):
                    done[i], errors[i] = True, matchers[i].get_error() or "the grammar rejected a token"
                    continue
                out_toks[i].append(t)
                if matchers[i].is_stopped():
                    done[i] = True
        del state
        self.stats["constrained_tokens"] += sum(len(t) for t in out_toks)
        self.stats["constrained_s"] += time.perf_counter() - t0
        res: list = []
        for i in range(N):
            if not errors[i] and not matchers[i].is_accepting():
                errors[i] = f"the reply was cut at max_tokens={max_new} before its JSON was complete"
            if errors[i]:
                res.append(BackendError(f"constrained decoding failed: {errors[i][:200]}"))
            else:
                res.append(self._text(out_toks[i]))
        return res
