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
