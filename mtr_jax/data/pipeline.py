"""Input pipelines on `grain`: seeded shuffle, per-process sharding, SFT packing, resumable state.

    it = sft_batches(examples, seq_len=512, batch_size=8, seed=0)   # examples: [(ids, loss_mask), ...]
    batch = next(it)  # {"tokens", "loss_mask", "segment_ids", "positions"}: np.int32 [batch_size, seq_len]
    state = it.get_state()          # JSON-serialisable dict: save it with the checkpoint
    it = sft_batches(...same args...); it.set_state(state)   # continues with the next unseen example

Order of operations (the same on every process, so shards are disjoint and cover the data):
source -> shard `[shard_index::shard_count]` -> shuffle(seed), reshuffled every epoch -> repeat
(`epochs`, 0 = forever; an epoch boundary is just the next index, so a run resumed there goes on)
-> [SFT: truncate or drop over-long examples -> first-fit pack into rows of seq_len] -> batch.

Packing: each row holds whole examples; `segment_ids` are 1..k in the order the examples were
placed, 0 on padding; `positions` restart at 0 in each segment; padding tokens are `pad_id`, loss
mask 0. Examples never cross rows: an example longer than seq_len is cut to seq_len
(`long="truncate"`) or left out (`long="drop"`); either way it is counted in `it.stats`.
With `epochs` > 0 the last batch is completed with empty rows (segment 0, loss mask 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import grain
import numpy as np

from mtr_jax.errors import MtrError


@dataclass
class PipelineStats:
    examples: int = 0  # examples in this shard (one epoch)
    truncated: int = 0  # over-long examples cut to seq_len (per epoch)
    dropped: int = 0  # over-long (long="drop") or empty examples left out (per epoch)


class ResumableIterator:
    """A grain DatasetIterator with `get_state()/set_state()` (JSON-serialisable) and `stats`."""

    def __init__(self, dataset: grain.IterDataset, stats: PipelineStats):
        self._it = iter(dataset)
        self.stats = stats

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return self._it.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        try:
            self._it.set_state(state)
        except (KeyError, TypeError, ValueError) as e:
            raise MtrError(f"data iterator state does not match this pipeline ({type(e).__name__}: {e})") from None


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax  # only when the caller did not say: multi-host runs shard by JAX process

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not (shard_count >= 1 and 0 <= shard_index < shard_count):
        raise MtrError(f"bad data shard {shard_index} of {shard_count}")
    return shard_index, shard_count


def _shuffled(items: Sequence, seed: int, shard_index, shard_count, epochs: int, shuffle: bool) -> grain.MapDataset:
    if epochs < 0:
        raise MtrError(f"epochs must be >= 0 (0 = forever), got {epochs}")
    i, n = _shard(shard_index, shard_count)
    ds = grain.MapDataset.source(items)[i::n]
    if len(ds) == 0:
        raise MtrError(f"data shard {i} of {n} is empty ({len(items)} items in all)")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(epochs or None)


def _as_example(k: int, ex) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(ex, dict):
        ids, mask = ex.get("tokens", ex.get("ids")), ex.get("loss_mask")
    else:
        ids, mask = ex
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    if ids.ndim != 1 or ids.shape != mask.shape:
        raise MtrError(f"SFT example {k}: ids {ids.shape} and loss_mask {mask.shape} must be equal 1-D lengths")
    return ids, mask


def sft_batches(
    examples: Sequence,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    epochs: int = 0,
    long: str = "truncate",
    pad_id: int = 0,
    packing_bins: int | None = None,
    shuffle: bool = True,
) -> ResumableIterator:
    """Packed SFT batches: dict of np.int32 [batch_size, seq_len] (see the module docstring).

    examples: (ids, loss_mask) pairs or dicts with "tokens"/"ids" and "loss_mask".
    packing_bins: rows packed at once (first-fit; more bins = less padding), default batch_size.
    """
    if long not in ("truncate", "drop"):
        raise MtrError(f"long must be 'truncate' or 'drop', got {long!r}")
    if seq_len < 1 or batch_size < 1:
        raise MtrError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    i, n = _shard(shard_index, shard_count)
    stats = PipelineStats()
    kept = []
    for k in range(i, len(examples), n):  # validate and count this shard's examples once, up front
        ids, mask = _as_example(k, examples[k])
        stats.examples += 1
        if len(ids) == 0 or (len(ids) > seq_len and long == "drop"):
            stats.dropped += 1
            continue
        if len(ids) > seq_len:
            stats.truncated += 1
            ids, mask = ids[:seq_len], mask[:seq_len]
        kept.append({"tokens": ids, "loss_mask": mask})
    if not kept:
        raise MtrError(f"no SFT example left in data shard {i} of {n} ({stats.examples} read, {stats.dropped} "
                       f"empty or longer than seq_len={seq_len} with long='drop')")
    ds = _shuffled(kept, seed, 0, 1, epochs, shuffle).to_iter_dataset()
    ds = grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct={"tokens": seq_len, "loss_mask": seq_len},
        num_packing_bins=packing_bins or batch_size,
        shuffle_bins=False,
        padding_struct={"tokens": pad_id, "loss_mask": 0},
    )
    ds = ds.map(
        lambda r: {
            "tokens": r["tokens"].astype(np.int32),
            "loss_mask": r["loss_mask"].astype(np.int32),
            "segment_ids": r["tokens_segment_ids"],
            "positions": r["tokens_positions"],
        }
    )
    # the last batch of a finite run is padded with empty rows: static shape, no example lost
    return ResumableIterator(ds.batch(batch_size, batch_fn=lambda rows: _stack_padded(rows, batch_size, pad_id)), stats)


def _stack_padded(rows: list[dict], batch_size: int, pad_id: int) -> dict[str, np.ndarray]:
    out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    if len(rows) < batch_size:
        extra = ((0, batch_size - len(rows)), (0, 0))
        out = {k: np.pad(v, extra, constant_values=pad_id if k == "tokens" else 0) for k, v in out.items()}
    return out


def question_batches(
    records: Sequence,
    batch_size: int,
    seed: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    epochs: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> ResumableIterator:
    """Lists of `batch_size` records (e.g. QARecords for GRPO prompts), same order/state semantics."""
    if batch_size < 1:
        raise MtrError(f"batch_size must be >= 1, got {batch_size}")
    ds = _shuffled(list(records), seed, shard_index, shard_count, epochs, shuffle).to_iter_dataset()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=list)
    i, n = _shard(shard_index, shard_count)
    return ResumableIterator(ds, PipelineStats(examples=len(range(i, len(records), n))))


def _bucket(n: int, lo: int = 64) -> int:
    return max(1 << (max(n, 1) - 1).bit_length(), lo)


def shared_prefix_layout(rows: list[tuple[np.ndarray, np.ndarray]], groups: int, pad_id: int = 0) -> dict:
    """`rows` (ids, loss_mask) in `groups` equal groups -> completion coordinates: each group's
    longest common prefix that carries no label (its system prompt and tool schemas, in MTR
    traces) as prompts [groups, P] / prompt_lens [groups], every row's remainder as completions
    [rows, C] with its loss mask. P is a multiple of 128, C a power of two >= 64: few shapes."""
    per = len(rows) // groups
    lens, spans = [], []
    for g in range(groups):
        grp = rows[g * per:(g + 1) * per]
        first = grp[0][0]
        p = min(len(ids) for ids, _ in grp) - 1  # every row keeps at least one completion token
        for ids, _ in grp[1:]:
            neq = np.nonzero(ids[:p] != first[:p])[0]
            p = min(p, int(neq[0]) if len(neq) else p)
        for _, m in grp:  # the prefix holds no label (a label inside it would be a prompt token)
            lab = np.nonzero(m[:p])[0]
            p = min(p, int(lab[0]) if len(lab) else p)
        p = max(p, 1)
        lens.append(p)
        spans += [(ids[p:], m[p:]) for ids, m in grp]
    P = max(-(-max(lens) // 128) * 128, 128)
    C = _bucket(max(len(c) for c, _ in spans))
    prompts = np.full((groups, P), pad_id, np.int32)
    comp = np.full((len(rows), C), pad_id, np.int32)
    mask = np.zeros((len(rows), C), np.int32)
    for g in range(groups):
        prompts[g, :lens[g]] = rows[g * per][0][:lens[g]]
    for r, (c, m) in enumerate(spans):
        comp[r, :len(c)], mask[r, :len(c)] = c, m
    return {"prompts": prompts, "prompt_lens": np.asarray(lens, np.int32), "completions": comp, "mask": mask,
            "real_tokens": np.asarray(sum(lens) + sum(len(c) for c, _ in spans), np.int64)}


def shared_prefix_batches(examples: Sequence, batch_size: int, groups: int = 1, seed: int = 0,
                          shard_index: int | None = None, shard_count: int | None = None, pad_id: int = 0,
                          shuffle: bool = True) -> ResumableIterator:
    """SFT batches in completion coordinates (`shared_prefix_layout`): `batch_size` examples a
    step, in `groups` groups (one per micro-batch) that each run their common prefix once. The
    same shuffle, sharding and resumable state as `sft_batches`; examples are never packed."""
    if batch_size < 1 or groups < 1 or batch_size % groups:
        raise MtrError(f"batch_size={batch_size} must be a positive multiple of groups={groups}")
    i, n = _shard(shard_index, shard_count)
    stats = PipelineStats()
    kept = []
    for k in range(i, len(examples), n):
        ids, mask = _as_example(k, examples[k])
        stats.examples += 1
        if len(ids) < 2 or not mask.any():
            stats.dropped += 1
            continue
        kept.append((ids, mask))
    if not kept:
        raise MtrError(f"no SFT example left in data shard {i} of {n}")
    ds = _shuffled(list(range(len(kept))), seed, 0, 1, 0, shuffle).to_iter_dataset()
    ds = ds.batch(batch_size, drop_remainder=True,
                  batch_fn=lambda idx: shared_prefix_layout([kept[j] for j in idx], groups, pad_id))
    return ResumableIterator(ds, stats)
