"""GGUF (llama.cpp's format) in: config from the metadata, tensors dequantized by the `gguf` package.

Nothing here decodes a quantization format: `gguf.GGUFReader` memory-maps the file and
`gguf.quants.dequantize` (llama.cpp's own reference code) turns each Q4_K/Q5_0/Q6_K/Q8_0/...
block into float32. Tensor names come from `gguf`'s own HF <-> GGUF name map for the qwen2
architecture. `GGUFWeights` offers the same `shape(name)` / `get(name)` interface as the
safetensors reader, in Hugging Face names and orientation ([out, in]), so `hf_io` loads a GGUF
through the same one-tensor-at-a-time path into the target shardings.
"""

from __future__ import annotations

import collections
import mmap
import pathlib

import numpy as np

from mtr_jax.errors import MtrError


def _reader(path: pathlib.Path):
    try:
        import gguf
    except ImportError:
        raise MtrError(f"{path}: reading GGUF needs the 'gguf' package (pip install gguf)") from None
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # truncated, bad magic, bad header: numpy/struct/ValueError all mean "not readable"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MtrError(f"{path}: not a readable GGUF file ({type(e).__name__}: {msg[:160]})") from None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:
        return default


def gguf_config(reader, path) -> "Qwen2Config":
    """Qwen2Config from GGUF metadata (`qwen2.*` keys, the vocabulary, presence of output.weight)."""
    from mtr_jax.model.qwen2 import Qwen2Config

    arch = _field(reader, "general.architecture")
    if arch != "qwen2":
        raise MtrError(f"{path}: GGUF architecture is '{arch}', not qwen2 (Qwen2/Qwen2.5 only)")
    need = {
        "num_hidden_layers": "qwen2.block_count",
        "hidden_size": "qwen2.embedding_length",
        "intermediate_size": "qwen2.feed_forward_length",
        "num_attention_heads": "qwen2.attention.head_count",
    }
    kw = {}
    for k, key in need.items():
        v = _field(reader, key)
        if v is None:
            raise MtrError(f"{path}: GGUF metadata lacks '{key}'")
        kw[k] = int(v)
    kw["num_key_value_heads"] = int(_field(reader, "qwen2.attention.head_count_kv", kw["num_attention_heads"]))
    kw["max_position_embeddings"] = int(_field(reader, "qwen2.context_length", 32768))
    kw["rope_theta"] = float(_field(reader, "qwen2.rope.freq_base", 10000.0))
    kw["rms_norm_eps"] = float(_field(reader, "qwen2.attention.layer_norm_rms_epsilon", 1e-6))
    names = {t.name: t for t in reader.tensors}
    emb = names.get("token_embd.weight")
    if emb is None:
        raise MtrError(f"{path}: GGUF has no token_embd.weight tensor")
    kw["vocab_size"] = int(emb.shape[-1])  # GGML order: [hidden, vocab]
    kw["tie_word_embeddings"] = "output.weight" not in names
    for k, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        v = _field(reader, key)
        if v is not None:
            kw[k] = int(v)
    if _field(reader, "qwen2.rope.scaling.type") not in (None, "none"):
        raise MtrError(f"{path}: rope scaling '{_field(reader, 'qwen2.rope.scaling.type')}' is not supported")
    return Qwen2Config(**kw)


_ROWS = 4096  # rows dequantized at a time


class GGUFWeights:
    """Lazy HF-named view of a GGUF's tensors. `get` dequantizes (float32, [out, in]); the last
    `keep` results are memoised because a sharded load asks for each tensor once per device."""

    def __init__(self, path, reader=None, keep: int = 32):
        import gguf

        self.path = pathlib.Path(path)
        self.reader = reader or _reader(self.path)
        n_blocks = int(_field(self.reader, "qwen2.block_count", 0))
        self._map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, n_blocks)
        self._tensors = {t.name: t for t in self.reader.tensors}
        self._memo: collections.OrderedDict = collections.OrderedDict()
        self._keep = keep

    def _tensor(self, hf_name: str):
        g = self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if g is None or g not in self._tensors:
            return None
        return self._tensors[g]

    def __contains__(self, hf_name: str) -> bool:
        return self._tensor(hf_name) is not None

    def gguf_name(self, hf_name: str) -> str:
        t = self._tensor(hf_name)
        if t is None:
            raise KeyError(hf_name)
        return t.name

    def shape(self, hf_name: str) -> tuple:
        t = self._tensor(hf_name)
        return tuple(int(x) for x in reversed(t.shape))  # GGML lists the fastest axis first

    def clear(self) -> None:
        """Drop the dequantized copies, and the file pages read so far (a memory map's resident pages
        count against the host; they are read again from the page cache if needed)."""
        self._memo.clear()
        mm = getattr(getattr(self.reader, "data", None), "_mmap", None)
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (AttributeError, ValueError, OSError):
            pass  # not a memory map, or no madvise on this platform: only memory use differs

    def get(self, hf_name: str) -> np.ndarray:
        if hf_name in self._memo:
            self._memo.move_to_end(hf_name)
            return self._memo[hf_name]
        import gguf

        t = self._tensor(hf_name)
        want = self.shape(hf_name)
        try:
            data = t.data
            if data.ndim >= 2 and len(want) >= 2 and data.shape[0] == want[0]:
                # row blocks: dequantization's float temporaries stay small beside the result
                a = np.empty((want[0], int(np.prod(want[1:]))), np.float32)
                for i in range(0, want[0], _ROWS):
                    a[i:i + _ROWS] = np.asarray(gguf.quants.dequantize(data[i:i + _ROWS], t.tensor_type),
                                                np.float32).reshape(-1, a.shape[1])
            else:
                a = gguf.quants.dequantize(data, t.tensor_type)
        except NotImplementedError as e:
            raise MtrError(f"{self.path}: tensor '{t.name}' has type {t.tensor_type.name}, which gguf cannot dequantize ({e})") from None
        except Exception as e:  # a truncated data section shows up here as a short buffer
            raise MtrError(f"{self.path}: tensor '{t.name}' cannot be read ({type(e).__name__}: {str(e)[:120]}); the file may be truncated") from None
        if int(np.prod(a.shape)) != int(np.prod(want)):
            raise MtrError(f"{self.path}: tensor '{t.name}' holds {a.size} values, expected {want}; the file may be truncated")
        a = np.asarray(a, np.float32).reshape(want)
        self._memo[hf_name] = a
        while len(self._memo) > self._keep:
            self._memo.popitem(last=False)
        return a


def open_gguf(path) -> tuple["Qwen2Config", GGUFWeights]:
    """-> (Qwen2Config from the metadata, HF-named weights) for a GGUF file."""
    path = pathlib.Path(path)
    reader = _reader(path)
    cfg = gguf_config(reader, path)
    # the vocabulary fields are ~0.6 GB of small arrays for a 152k vocabulary, and the weights do not
    # need them (the tokenizer is read separately)
    for k in [k for k in reader.fields if k.startswith("tokenizer.ggml.") and not k.endswith("_id")]:
        del reader.fields[k]
    return cfg, GGUFWeights(path, reader=reader, keep=1)  # hf_io reads each tensor once
