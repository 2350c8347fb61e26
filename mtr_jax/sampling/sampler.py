"""Jitted sampler: grouped prefill, decode loop inside `jit`, stop sequences, multi-turn continuation.

Row model. Every row is a token sequence whose tokens are all in the KV cache except the LAST one,
the row's *pending* token. `start` prefills prompt[:-1] and keeps prompt[-1] pending; each decode
step feeds the pending token and samples the next one (which becomes pending); `append` feeds the
pending token plus all but the last appended token. So the token that ends a turn (eos, the last
token of a stop sequence) is part of the output and is written into the cache before the
appended continuation, and a row's length is always `cache end + 1` (`SamplerState.row_lengths`).
A row may grow to at most `cache_len` tokens.

Static shapes. Prompt/append chunk lengths, batch sizes and the output buffer (max_new_tokens) are
padded to buckets (powers of two by default; rows: powers of two to 8, then multiples of 8 to 512, as
vLLM sizes its CUDA graphs), so a long run compiles a handful of programs:
`start` per (prompt batch, chunk, row batch) bucket, `generate` per (batch, max_new bucket, attention window bucket,
greedy-only?, top-k/top-p used?), `append` per (batch, chunk) bucket, `keep_rows` per (old, new) row
bucket. Values that change per call
(temperatures, top-k, top-p, max_new_tokens, the key, which rows are active) are traced. The
cache is donated: a state passed to `generate`/`append` is consumed; use the returned one.

Prefix caching. Prompts of one `start` call that begin with the same tokens (MTR's system prompt
and tool schemas: ~370 of a prompt's ~400 tokens) have that common prefix prefilled ONCE (batch
1) and its keys/values copied to every row; each row then prefills only its own suffix on top
(vLLM's automatic prefix caching / SGLang's radix cache, for the prefix a batch shares). Grouped
rows (G per prompt) share their whole prompt as before. Same tokens as a full prefill (tested).

Sharding. With `mesh=`, rows are sharded over the mesh's batch axes (`data`, `fsdp` where present;
batch buckets are multiples of their size) and the cache is constrained to that layout; params keep
whatever shardings the caller gave them (GSPMD propagates the rest). With several processes (a pod
slice) each process passes and gets back ITS rows only: N, buckets and outputs are host-local, the
global batch is the processes' buckets concatenated, and every shape choice is agreed across the
processes (`parallel.hosts`), so all of them run the same programs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mtr_jax.errors import MtrError
from mtr_jax.model.qwen2 import Qwen2Config
from mtr_jax.parallel import hosts
from mtr_jax.sampling import decode
from mtr_jax.sampling.decode import REASONS, forward_chunk

BATCH_AXES = ("data", "fsdp")


@dataclass(frozen=True)
class SamplingParams:
    """Decoding controls. greedy=True (or temperature == 0) takes the argmax; top_k=0 and
    top_p=1.0 disable those filters (applied in that order to the tempered logits)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def validate(self, where: str = "sampling") -> None:
        if not (self.temperature >= 0.0):
            raise MtrError(f"{where}.temperature={self.temperature}: must be >= 0")
        if self.top_k < 0:
            raise MtrError(f"{where}.top_k={self.top_k}: must be >= 0 (0 = off)")
        if not (0.0 < self.top_p <= 1.0):
            raise MtrError(f"{where}.top_p={self.top_p}: must be in (0, 1]")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


@dataclass
class SampleOutput:
    """One `generate` call, rows in state order. tokens [N, max_new] int32 (pad_id after length; the
    eos / stop token that ended a row is included), lengths [N], stop_reason [N] str in {"eos",
    "stop", "length", "cache_full", "inactive"}, logprobs [N, max_new] float32 under the
    distribution actually sampled from (temperature/top-k/top-p applied; 0 for greedy rows: a point
    mass), plain_logprobs [N, max_new]: log_softmax of the raw logits at temperature 1,
    policy_logprobs [N, max_new]: log_softmax(logits / temperature) without top-k/top-p (greedy rows:
    temperature 1): the policy the trainer scores at `grpo.temperature`, so GRPO's sampler-vs-trainer
    gap compares like with like at any temperature. Entries after a row's length are 0."""

    tokens: np.ndarray
    lengths: np.ndarray
    stop_reason: np.ndarray
    logprobs: np.ndarray
    plain_logprobs: np.ndarray
    policy_logprobs: np.ndarray


@dataclass
class SamplerState:
    """KV cache + per-row pending token (see module doc). row_lengths [N]: each row's full sequence
    length (prompt + everything generated/appended). Rows are prompt-major: row = p * G + g."""

    cache: dict
    pending: jax.Array  # [Nb] int32
    row_lengths: np.ndarray  # [N] int64, host copy (no device sync needed to read it)
    n_prompts: int
    group_size: int

    @property
    def n_rows(self) -> int:
        return len(self.row_lengths)

    @property
    def batch_bucket(self) -> int:
        return int(self.pending.shape[0])


def _row_buckets(lo: int, hi: int = 1 << 16) -> tuple:
    """Row buckets as vLLM sizes its CUDA graphs: powers of two up to 8, then every multiple of 8 up
    to 512, then powers of two. A batch of 100 runs 104 rows, not 128 (19% fewer rows per decode
    step); a run still compiles one program per batch size it meets, and it meets few."""
    out = [b for b in _pow2_buckets(lo, 8) if b < 8] + list(range(max(8, -(-lo // 8) * 8), 513, 8))
    return tuple(out) + tuple(b for b in _pow2_buckets(1024, hi) if b > out[-1])


def _pow2_buckets(lo: int, hi: int) -> tuple:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return tuple(out)


class Sampler:
    """Jitted sampler over a Qwen2 `config`. Per instance: cache_len (max tokens a row may hold),
    eos_ids and stop_sequences (token-id sequences checked per row on the tokens generated in the
    current `generate` call), pad_id for outputs, cache_dtype (default: compute dtype; bf16
    halves memory), mesh (optional), bucket lists (ascending ints), and unstack_layers (decode
    over per-layer weight copies; default: on the CPU backend, where it is ~3x faster)."""

    def __init__(self, config: Qwen2Config, *, cache_len: int, eos_ids: Sequence[int],
                 stop_sequences: Sequence[Sequence[int]] = (), pad_id: int = 0, cache_dtype=None, mesh=None,
                 prompt_buckets: Sequence[int] | None = None, batch_buckets: Sequence[int] | None = None,
                 new_token_buckets: Sequence[int] | None = None, unstack_layers: bool | None = None,
                 share_prefix: bool = True, min_shared_prefix: int = 32):
        self.cfg = config
        V = config.vocab_size
        if cache_len <= 1:
            raise MtrError(f"Sampler cache_len={cache_len}: must be >= 2")
        self.cache_len = int(cache_len)
        eos_ids = tuple(int(t) for t in (eos_ids or ()))
        for t in eos_ids:
            if not 0 <= t < V:
                raise MtrError(f"Sampler eos_ids: token id {t} is outside the vocabulary [0, {V})")
        stops = []
        for i, s in enumerate(stop_sequences or ()):
            s = tuple(int(t) for t in s)
            if not s:
                raise MtrError(f"Sampler stop_sequences[{i}] is empty")
            bad = [t for t in s if not 0 <= t < V]
            if bad:
                raise MtrError(f"Sampler stop_sequences[{i}]: token ids {bad} are outside the vocabulary [0, {V})")
            stops.append(s)
        if not 0 <= pad_id < V:
            raise MtrError(f"Sampler pad_id={pad_id} is outside the vocabulary [0, {V})")
        self.eos_ids, self.stop_sequences, self.pad_id = eos_ids, tuple(stops), int(pad_id)
        self.cache_dtype = cache_dtype or config.compute_dtype
        self.mesh = mesh
        # decode loop over per-layer weight copies: default on CPU only (see decode.unstack_layers)
        self.unstack_layers = (jax.default_backend() == "cpu") if unstack_layers is None else bool(unstack_layers)
        self.batch_axes = tuple(a for a in BATCH_AXES if mesh is not None and a in mesh.axis_names)
        self.batch_multiple = int(np.prod([mesh.shape[a] for a in self.batch_axes])) if self.batch_axes else 1
        if hosts.multi():  # host-local rows: each process's bucket is a multiple of ITS batch devices
            if mesh is None or self.batch_multiple % hosts.count():
                raise MtrError(f"Sampler: {hosts.count()} processes need a mesh whose batch axes (data x fsdp = "
                               f"{self.batch_multiple}) split evenly over them")
            self.batch_multiple //= hosts.count()
        self.prompt_buckets = tuple(sorted(prompt_buckets or _pow2_buckets(16, self.cache_len)))
        # no batch-1 programs on CPU: XLA's CPU matrix-vector path runs a 0.5B decode step ~4x
        # slower at 1 row than at 2 (552 vs 143 ms, measured), so one row is padded to two
        min_batch = 2 if jax.default_backend() == "cpu" else 1
        self.batch_buckets = tuple(sorted(batch_buckets or _row_buckets(min_batch)))
        self.new_token_buckets = tuple(sorted(new_token_buckets or _pow2_buckets(16, 1 << 20)))
        self.share_prefix, self.min_shared_prefix = bool(share_prefix), int(min_shared_prefix)
        self._prefill = jax.jit(self._prefill_impl)
        self._prefill_shared = jax.jit(self._prefill_shared_impl)
        self._append = jax.jit(self._append_impl, donate_argnums=(1,))
        self._generate = jax.jit(self._generate_impl, donate_argnums=(1,),
                                 static_argnames=("out_len", "all_greedy", "use_filter", "window"))
        self._step = jax.jit(self._step_impl, donate_argnums=(1,), static_argnames=("window",))
        self._select = jax.jit(self._select_impl)  # a smaller output: nothing to donate into
        # decode attends over the first `window` cache slots only: a power of two >= what the rows
        # can fill during the call (history + max_new), so short rows in a long cache stay cheap
        self.window_buckets = _pow2_buckets(64, self.cache_len)

    # ---------------------------------------------------------------- shapes and placement

    @staticmethod
    def _bucket(n: int, buckets: Sequence[int], cap: int | None = None) -> int:
        for b in buckets:
            if b >= n:
                return min(b, cap) if cap else b
        return min(n, cap) if cap else n  # beyond the last bucket: exact (one more program)

    def _batch_bucket(self, n: int) -> int:
        """This process's row bucket for n rows (the same on every process)."""
        b = self._bucket(n, self.batch_buckets)
        m = self.batch_multiple
        return hosts.agree_max(-(-b // m) * m)[0]

    def _rows(self, x):
        """Place a host array with its leading (row) axis sharded over the batch axes."""
        x = np.asarray(x)
        if self.mesh is None:
            return jnp.asarray(x)
        if hosts.multi():  # this process's rows of the global batch
            return hosts.to_global(x, self.mesh, self.batch_axes)
        spec = P(self.batch_axes or None, *([None] * (x.ndim - 1)))
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def _host(self, x) -> np.ndarray:
        """A row-sharded output -> this process's rows on the host."""
        return hosts.to_local(x, self.mesh, self.batch_axes) if hosts.multi() else np.asarray(jax.device_get(x))

    def _same(self, x):
        """A value every process holds identically (the shared prefix) -> a jit argument."""
        return hosts.replicated(x, self.mesh) if hosts.multi() else jnp.asarray(x)

    @staticmethod
    def _local_bucket(state) -> int:
        return state.batch_bucket // hosts.count()

    def _constrain_cache(self, x):
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(None, self.batch_axes or None)))

    def _check_tokens(self, seq, what: str) -> None:
        if len(seq) and (min(seq) < 0 or max(seq) >= self.cfg.vocab_size):
            raise MtrError(f"{what}: token ids outside the vocabulary [0, {self.cfg.vocab_size})")

    # ---------------------------------------------------------------- jitted bodies

    def _prefill_impl(self, params, tokens, lengths, last, src):
        """Prefill [Pb, C] into a fresh cache, then give row r the cache of prompt src[r]."""
        cfg = self.cfg
        Pb = tokens.shape[0]
        # heads first: decode attention reads [B, Hkv, S, D] per layer with no transpose
        shape = (cfg.num_hidden_layers, Pb, cfg.num_key_value_heads, self.cache_len, cfg.head_dim)
        k = self._constrain_cache(jnp.zeros(shape, self.cache_dtype))
        v = self._constrain_cache(jnp.zeros(shape, self.cache_dtype))
        end = jnp.zeros((Pb,), jnp.int32)
        _, k, v, end = forward_chunk(params, cfg, k, v, end, tokens, lengths, want_logits=False, fresh=True)
        k, v = self._constrain_cache(jnp.take(k, src, axis=1)), self._constrain_cache(jnp.take(v, src, axis=1))
        return {"k": k, "v": v, "end": jnp.take(end, src)}, jnp.take(last, src)

    def _prefill_shared_impl(self, params, prefix, prefix_len, tokens, lengths, last, src):
        """Prefill the common prefix [1, Cp] once, copy its cache to all Pb rows, prefill each row's
        suffix [Pb, C] after it, then give row r the cache of prompt src[r]."""
        cfg = self.cfg
        Pb = tokens.shape[0]
        one = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, self.cache_len, cfg.head_dim)
        k1, v1 = jnp.zeros(one, self.cache_dtype), jnp.zeros(one, self.cache_dtype)
        _, k1, v1, end1 = forward_chunk(params, cfg, k1, v1, jnp.zeros((1,), jnp.int32), prefix, prefix_len,
                                        want_logits=False, fresh=True)
        k = self._constrain_cache(jnp.broadcast_to(k1, (one[0], Pb) + one[2:]))
        v = self._constrain_cache(jnp.broadcast_to(v1, (one[0], Pb) + one[2:]))
        end = jnp.broadcast_to(end1, (Pb,))
        _, k, v, end = forward_chunk(params, cfg, k, v, end, tokens, lengths, want_logits=False)
        k, v = self._constrain_cache(jnp.take(k, src, axis=1)), self._constrain_cache(jnp.take(v, src, axis=1))
        return {"k": k, "v": v, "end": jnp.take(end, src)}, jnp.take(last, src)

    @staticmethod
    def _global_prefix_len(first, n_pre: int) -> int:
        """The prefix every process's prompts share: each process's common prefix is a prefix of
        its first prompt, so compare those first prompts (padded with -1) and take the shortest."""
        (L,) = hosts.agree_max(len(first))
        mine = np.full((L + 1,), -1, np.int64)
        mine[0], mine[1:len(first) + 1] = n_pre, first
        allp = hosts.gather(mine)
        n = int(allp[:, 0].min())
        diff = np.nonzero((allp[:, 1:n + 1] != allp[:1, 1:n + 1]).any(axis=0))[0]
        return int(diff[0]) if diff.size else n

    @staticmethod
    def common_prefix_len(prompts) -> int:
        """Length of the token prefix every prompt shares."""
        first = np.asarray(prompts[0])
        n = min(len(p) for p in prompts)
        for p in prompts[1:]:
            p = np.asarray(p[:n])
            diff = np.nonzero(p != first[:n])[0]
            n = int(diff[0]) if diff.size else n
            if n == 0:
                break
        return n

    def _append_impl(self, params, cache, pending, chunk, lengths):
        """Feed [pending, chunk[:len-1]] per row; the last appended token becomes pending."""
        full = jnp.concatenate([pending[:, None], chunk], axis=1)
        _, k, v, end = forward_chunk(params, self.cfg, cache["k"], cache["v"], cache["end"], full[:, :-1], lengths,
                                     want_logits=False)
        new_pending = jnp.take_along_axis(full, lengths[:, None], axis=1)[:, 0]
        return {"k": self._constrain_cache(k), "v": self._constrain_cache(v), "end": end}, new_pending

    def _generate_impl(self, params, cache, pending, active, max_new, key, temperature, top_k, top_p, greedy, *,
                       out_len, all_greedy, use_filter, window):
        if self.unstack_layers:
            params = decode.unstack_layers(params)
        full = cache
        if window < cache["k"].shape[3]:  # rows cannot reach slot `window` in this call (see generate)
            cache = {"k": full["k"][:, :, :, :window], "v": full["v"][:, :, :, :window], "end": full["end"]}
        new_cache, *rest = decode.decode_loop(
            params, self.cfg, cache, pending, active, max_new, key, temperature, top_k, top_p, greedy,
            out_len=out_len, eos_ids=self.eos_ids, stop_seqs=self.stop_sequences, all_greedy=all_greedy,
            use_filter=use_filter, constrain=self._constrain_cache,
        )
        if window < full["k"].shape[3]:
            put = lambda big, small: self._constrain_cache(jax.lax.dynamic_update_slice(big, small, (0,) * big.ndim))
            new_cache = {"k": put(full["k"], new_cache["k"]), "v": put(full["v"], new_cache["v"]), "end": new_cache["end"]}
        return (new_cache, *rest)

    def _step_impl(self, params, cache, pending, active, allowed_bits, *, window):
        """One greedy decode step under a token mask: feed each active row's pending token and
        take the best token its mask allows (bit t of allowed_bits[b, t // 32] = token t allowed;
        llguidance's bitmask layout)."""
        full = cache
        if window < cache["k"].shape[3]:
            cache = {"k": full["k"][:, :, :, :window], "v": full["v"][:, :, :, :window], "end": full["end"]}
        run = active & (full["end"] + 1 < full["k"].shape[3])
        logits, k, v, end = forward_chunk(params, self.cfg, cache["k"], cache["v"], cache["end"], pending[:, None],
                                          run.astype(jnp.int32), want_logits=True)
        ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
        words = jnp.take(allowed_bits, ids // 32, axis=1)
        allowed = (jnp.right_shift(words, ids % 32) & 1) == 1
        tok = jnp.argmax(jnp.where(allowed, logits[:, 0], -jnp.inf), axis=-1).astype(jnp.int32)
        if window < full["k"].shape[3]:
            put = lambda big, small: self._constrain_cache(jax.lax.dynamic_update_slice(big, small, (0,) * big.ndim))
            k, v = put(full["k"], k), put(full["v"], v)
        new_pending = jnp.where(run, tok, pending)
        return {"k": self._constrain_cache(k), "v": self._constrain_cache(v), "end": end}, new_pending

    def _select_impl(self, cache, pending, src):
        """Row r of the new (smaller) batch is row src[r] of the old one."""
        take = lambda x: self._constrain_cache(jnp.take(x, src, axis=1))
        return {"k": take(cache["k"]), "v": take(cache["v"]), "end": jnp.take(cache["end"], src)}, jnp.take(pending, src)

    # ---------------------------------------------------------------- public API

    def step_masked(self, params, state: SamplerState, allowed_bits: np.ndarray, active: np.ndarray,
                    window_hint: int = 0) -> tuple[SamplerState, np.ndarray]:
        """Constrained decoding, one token per call: each active row takes the most likely token
        that `allowed_bits` ([N, ceil(V/32)] int32, a grammar's bitmask) allows; the chosen token
        becomes the row's pending token (so it is fed by the next step, like `generate`'s output).
        -> (state, tokens [N]). One host round trip per token: the grammar matcher lives on the
        host. `window_hint`: tokens the caller may still add (keeps one attention-window bucket
        for the whole constrained generation). Consumes `state`."""
        N, Nb = state.n_rows, self._local_bucket(state)
        W = -(-self.cfg.vocab_size // 32)
        bits = np.zeros((Nb, W), np.int32)
        a = np.asarray(allowed_bits, np.int32)
        if a.ndim != 2 or a.shape[0] != N or a.shape[1] > W:
            raise MtrError(f"Sampler.step_masked: allowed_bits has shape {a.shape}, expected ({N}, <= {W})")
        bits[:N, : a.shape[1]] = a
        act = np.zeros((Nb,), bool)
        act[:N] = np.asarray(active, bool).reshape(-1)
        (need,) = hosts.agree_max(int(state.row_lengths.max()) + max(1, int(window_hint)))
        window = self._bucket(need, self.window_buckets, cap=self.cache_len)
        cache, pending = self._step(params, state.cache, state.pending, self._rows(act), self._rows(bits), window=window)
        fits = state.row_lengths + 1 <= self.cache_len
        ran = act[:N] & fits
        toks = self._host(pending)[:N]
        return SamplerState(cache, pending, state.row_lengths + ran, state.n_prompts, state.group_size), toks

    def rollout_params(self, params):
        """The weights the sampler should read: every matmul weight (`*_w`, embed, lm_head) in the compute dtype,
        made ONCE (jitted, shardings kept), not float32 master weights cast at every matmul of
        every decode step. Norms and biases stay as they are (the model reads them in float32).
        The trainer casts the same weights to the same dtype inside its matmuls, so log-probs agree;
        a tied embedding is also the input lookup, which this rounds to the compute dtype."""
        dt = self.cfg.compute_dtype

        def is_matmul(path) -> bool:
            name = getattr(path[-1], "key", "")
            return name.endswith("_w") or name in ("embed", "lm_head")

        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        if all(a.dtype == dt or not is_matmul(p) for p, a in flat):
            return params
        if not hasattr(self, "_cast_params"):
            self._cast_params = jax.jit(lambda q: jax.tree_util.tree_map_with_path(
                lambda p, a: a.astype(dt) if is_matmul(p) else a, q))
        return self._cast_params(params)

    def start(self, params, prompts: list[list[int]], group_size: int = 1) -> SamplerState:
        """Prefill each prompt ONCE and share its cache across `group_size` rows (row = p*G + g).
        The prompt's last token stays pending (fed by the first decode step)."""
        if not prompts:
            raise MtrError("Sampler.start: no prompts")
        if group_size < 1:
            raise MtrError(f"Sampler.start: group_size={group_size} must be >= 1")
        lens = []
        for i, p in enumerate(prompts):
            p = list(p)
            if not p:
                raise MtrError(f"Sampler.start: prompt {i} is empty")
            if len(p) > self.cache_len:
                raise MtrError(f"Sampler.start: prompt {i} has {len(p)} tokens, longer than cache_len={self.cache_len}")
            self._check_tokens(p, f"Sampler.start: prompt {i}")
            lens.append(len(p))
        P_, G = len(prompts), int(group_size)
        Pb = self._batch_bucket(P_)
        Nb = self._batch_bucket(P_ * G)
        # the shared prefix never takes a row's last token (it stays pending)
        shared = self.share_prefix and (P_ > 1 or hosts.multi())  # several processes: >1 prompt globally
        n_pre = min(self.common_prefix_len(prompts), min(lens) - 1) if shared else 0
        if hosts.multi():
            n_pre = self._global_prefix_len(prompts[0], n_pre)
        if n_pre < self.min_shared_prefix:
            n_pre = 0
        (C,) = hosts.agree_max(self._bucket(max(max(lens) - 1 - n_pre, 1), self.prompt_buckets, cap=self.cache_len))
        tokens = np.full((Pb, C), self.pad_id, np.int32)
        lengths = np.zeros((Pb,), np.int32)
        last = np.full((Pb,), self.pad_id, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : lens[i] - 1 - n_pre] = p[n_pre:-1]
            lengths[i] = lens[i] - 1 - n_pre
            last[i] = p[-1]
        src = np.zeros((Nb,), np.int32)
        # indices into the GLOBAL prompt batch: this process's prompts start at index() * Pb
        src[: P_ * G] = np.repeat(np.arange(P_, dtype=np.int32), G) + hosts.index() * Pb
        rows = (self._rows(tokens), self._rows(lengths), self._rows(last), self._rows(src))
        if n_pre:
            Cp = self._bucket(n_pre, self.prompt_buckets, cap=self.cache_len)
            prefix = np.full((1, Cp), self.pad_id, np.int32)
            prefix[0, :n_pre] = prompts[0][:n_pre]
            cache, pending = self._prefill_shared(params, self._same(prefix), self._same(np.asarray([n_pre], np.int32)), *rows)
        else:
            cache, pending = self._prefill(params, *rows)
        return SamplerState(cache, pending, np.repeat(np.asarray(lens, np.int64), G), P_, G)

    def generate(self, params, state: SamplerState, *, max_new_tokens: int, sampling: SamplingParams | Sequence[SamplingParams],
                 key, active: np.ndarray | None = None) -> tuple[SamplerState, SampleOutput]:
        """Decode inside one jitted `lax.while_loop`. Each active row stops on an eos id, a stop
        sequence, max_new_tokens, or when its sequence reaches cache_len ("cache_full"); the loop
        exits as soon as every row is done. Rows with active=False generate nothing ("inactive").
        `sampling`: one SamplingParams for all rows or one per row. `key`: a jax PRNG key (or int
        seed); the same key and inputs give the same samples. Consumes `state` (donated cache).
        Several processes: each passes its rows; max_new_tokens and the key must be the same on all."""
        N, Nb = state.n_rows, self._local_bucket(state)
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
            raise MtrError(f"Sampler.generate: max_new_tokens={max_new_tokens!r} must be a positive int")
        if isinstance(sampling, SamplingParams):
            per_row = [sampling] * N
        else:
            per_row = list(sampling)
            if len(per_row) != N:
                raise MtrError(f"Sampler.generate: {len(per_row)} SamplingParams for {N} rows")
        for i, s in enumerate(per_row):
            s.validate(f"sampling[{i}]")
        act = np.zeros((Nb,), bool)
        if active is None:
            act[:N] = True
        else:
            a = np.asarray(active, bool).reshape(-1)
            if a.shape[0] != N:
                raise MtrError(f"Sampler.generate: active has {a.shape[0]} entries for {N} rows")
            act[:N] = a
        greedy = np.ones((Nb,), bool)
        temp = np.ones((Nb,), np.float32)
        top_k = np.zeros((Nb,), np.int32)
        top_p = np.ones((Nb,), np.float32)
        for i, s in enumerate(per_row):
            greedy[i], temp[i], top_k[i], top_p[i] = s.is_greedy, s.temperature or 1.0, s.top_k, s.top_p
        all_greedy = bool(greedy[:N][act[:N]].all()) if act[:N].any() else True
        use_filter = bool(any(s.top_k > 0 or s.top_p < 1.0 for s, a in zip(per_row, act) if a and not s.is_greedy))
        # static arguments: one agreement for all of them (a no-op on one process)
        longest, not_greedy, use_filter = hosts.agree_max(int(state.row_lengths.max()), not all_greedy, use_filter)
        all_greedy, use_filter = not not_greedy, bool(use_filter)
        if isinstance(key, (int, np.integer)):
            key = jax.random.key(int(key))
        out_len = self._bucket(int(max_new_tokens), self.new_token_buckets)
        window = self._bucket(longest + int(max_new_tokens), self.window_buckets, cap=self.cache_len)
        cache, pending, toks, n, reason, lp, plp, tlp = self._generate(
            params, state.cache, state.pending, self._rows(act), jnp.int32(max_new_tokens), key, self._rows(temp),
            self._rows(top_k), self._rows(top_p), self._rows(greedy),
            out_len=out_len, all_greedy=all_greedy, use_filter=use_filter, window=window,
        )
        toks, n, reason, lp, plp, tlp = (self._host(x) for x in (toks, n, reason, lp, plp, tlp))
        M = int(max_new_tokens)
        n = np.asarray(n[:N], np.int32)
        keep = np.arange(M)[None, :] < n[:, None]
        out = SampleOutput(
            tokens=np.where(keep, toks[:N, :M], self.pad_id).astype(np.int32),
            lengths=n,
            stop_reason=np.asarray([REASONS[r] for r in reason[:N]]),
            logprobs=np.where(keep, lp[:N, :M], 0.0).astype(np.float32),
            plain_logprobs=np.where(keep, plp[:N, :M], 0.0).astype(np.float32),
            policy_logprobs=np.where(keep, tlp[:N, :M], 0.0).astype(np.float32),
        )
        new_state = SamplerState(cache, pending, state.row_lengths + n, state.n_prompts, state.group_size)
        return new_state, out

    def append(self, params, state: SamplerState, tokens: list[list[int]]) -> SamplerState:
        """Append per-row tokens (e.g. a tool response; [] = nothing) after what each row holds,
        extending its KV cache (the history is not prefilled again). Consumes `state`."""
        N, Nb = state.n_rows, self._local_bucket(state)
        if len(tokens) != N:
            raise MtrError(f"Sampler.append: {len(tokens)} token lists for {N} rows")
        lens = np.asarray([len(t) for t in tokens], np.int32)
        for i, t in enumerate(tokens):
            self._check_tokens(list(t), f"Sampler.append: row {i}")
            if state.row_lengths[i] + lens[i] > self.cache_len:
                raise MtrError(f"Sampler.append: row {i} would hold {state.row_lengths[i] + lens[i]} tokens, "
                               f"more than cache_len={self.cache_len}")
        if not hosts.any_(lens.any()):
            return state
        (C,) = hosts.agree_max(self._bucket(int(lens.max()), self.prompt_buckets, cap=self.cache_len))
        chunk = np.full((Nb, C), self.pad_id, np.int32)
        lengths = np.zeros((Nb,), np.int32)
        for i, t in enumerate(tokens):
            chunk[i, : lens[i]] = t
            lengths[i] = lens[i]
        cache, pending = self._append(params, state.cache, state.pending, self._rows(chunk), self._rows(lengths))
        return SamplerState(cache, pending, state.row_lengths + lens, state.n_prompts, state.group_size)

    def keep_rows(self, state: SamplerState, rows) -> SamplerState:
        """Only `rows` (this process's row indices, in the order given) go on, in the smallest
        batch bucket that holds them: finished episodes stop costing decode steps. Returns
        `state` itself when that bucket is not smaller (nothing is copied); otherwise a new state
        holding copies of those rows (use it instead of `state`). Several processes: each passes its own rows; the bucket is agreed."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= state.n_rows):
            raise MtrError(f"Sampler.keep_rows: row indices must be in [0, {state.n_rows})")
        Nb_old = self._local_bucket(state)
        Nb = self._batch_bucket(max(int(rows.size), 1))
        if Nb >= Nb_old:
            return state
        src = np.zeros((Nb,), np.int32)  # padding rows copy row 0: inactive, never read
        # indices into the GLOBAL batch: this process's rows start at index() * its old bucket
        src[: rows.size] = rows + hosts.index() * Nb_old
        cache, pending = self._select(state.cache, state.pending, self._rows(src))
        return SamplerState(cache, pending, state.row_lengths[rows], int(rows.size), 1)

    def compiled_programs(self) -> int:
        """How many programs the jitted entry points hold (for recompile checks)."""
        return sum(f._cache_size() for f in (self._prefill, self._prefill_shared, self._append, self._generate, self._step,
                                                self._select))
