"""grain pipelines: packing checked by an independent NumPy reconstruction, sharding, resumable state."""

import json
import pathlib

import numpy as np
import pytest

from mtr_jax.data.pipeline import question_batches, sft_batches
from mtr_jax.errors import MtrError

PAD = 7  # not a token any example uses? examples use values 1000+k, so 7 marks padding


def make_examples(n=40, seed=0, max_len=30):
    """Example k is the token 1000+k repeated, with a random loss mask: rows tell which example they came from."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        length = int(rng.integers(1, max_len))
        out.append((np.full(length, 1000 + k), rng.integers(0, 2, length)))
    return out


def unpack(batch, seq_len, pad=PAD):
    """NumPy oracle: split each row at segment boundaries; check every invariant of a packed row."""
    assert set(batch) == {"tokens", "loss_mask", "segment_ids", "positions"}
    assert all(v.dtype == np.int32 and v.shape[1] == seq_len for v in batch.values())
    pieces = []
    for tok, mask, seg, pos in zip(batch["tokens"], batch["loss_mask"], batch["segment_ids"], batch["positions"]):
        n_seg = int(seg.max())
        used = int((seg > 0).sum())
        assert (seg[:used] > 0).all() and (seg[used:] == 0).all()  # padding only at the end
        assert (tok[used:] == pad).all() and (mask[used:] == 0).all() and (pos[used:] == 0).all()
        for s in range(1, n_seg + 1):
            idx = np.nonzero(seg == s)[0]
            assert len(idx) and (np.diff(idx) == 1).all()  # one contiguous run
            assert (pos[idx] == np.arange(len(idx))).all()  # positions restart at 0
            assert len(set(tok[idx].tolist())) == 1  # one example per segment: never crosses
            pieces.append((int(tok[idx][0]) - 1000, mask[idx].copy()))
        if n_seg:
            assert sorted(set(seg[:used].tolist())) == list(range(1, n_seg + 1))
    return pieces


def take(it, n):
    return [next(it) for _ in range(n)]


def drain(it):
    return list(it)


def test_packing_one_epoch_is_exact():
    ex = make_examples()
    it = sft_batches(ex, seq_len=32, batch_size=4, seed=3, shard_index=0, shard_count=1, epochs=1, pad_id=PAD)
    pieces = [p for b in drain(it) for p in unpack(b, 32)]
    assert sorted(k for k, _ in pieces) == list(range(len(ex)))  # each example once
    for k, mask in pieces:
        np.testing.assert_array_equal(mask, ex[k][1])
    assert (it.stats.examples, it.stats.truncated, it.stats.dropped) == (40, 0, 0)


def test_truncate_and_drop_counted():
    ex = make_examples(max_len=30)
    long_ids = [k for k, (ids, _) in enumerate(ex) if len(ids) > 16]
    assert long_ids
    it = sft_batches(ex, 16, 4, seed=0, shard_index=0, shard_count=1, epochs=1, pad_id=PAD)
    pieces = dict(p for b in drain(it) for p in unpack(b, 16))
    assert it.stats.truncated == len(long_ids) and len(pieces) == 40
    for k in long_ids:
        np.testing.assert_array_equal(pieces[k], ex[k][1][:16])
    it = sft_batches(ex, 16, 4, seed=0, shard_index=0, shard_count=1, epochs=1, long="drop", pad_id=PAD)
    kept = sorted(k for b in drain(it) for k, _ in unpack(b, 16))
    assert it.stats.dropped == len(long_ids)
    assert kept == sorted(set(range(40)) - set(long_ids))


def test_two_processes_partition_the_data():
    ex = make_examples(n=41)  # odd: shards of 21 and 20
    seen = []
    for rank in range(2):
        it = sft_batches(ex, 32, 2, seed=5, shard_index=rank, shard_count=2, epochs=1, pad_id=PAD)
        seen.append(sorted(k for b in drain(it) for k, _ in unpack(b, 32)))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(41))
    q = [sorted(r for b in question_batches(list(range(41)), 4, seed=1, shard_index=i, shard_count=2, epochs=1,
                                            drop_remainder=False) for r in b) for i in range(2)]
    assert sorted(q[0] + q[1]) == list(range(41)) and not set(q[0]) & set(q[1])


def test_default_shard_is_jax_process():
    ex = make_examples(n=10)
    a = take(sft_batches(ex, 32, 2, seed=1), 3)
    b = take(sft_batches(ex, 32, 2, seed=1, shard_index=0, shard_count=1), 3)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_seeded_shuffle_and_reshuffle_per_epoch():
    recs = list(range(12))
    a = [r for b in take(question_batches(recs, 4, seed=0, shard_index=0, shard_count=1), 6) for r in b]
    b = [r for b in take(question_batches(recs, 4, seed=0, shard_index=0, shard_count=1), 6) for r in b]
    c = [r for b in take(question_batches(recs, 4, seed=1, shard_index=0, shard_count=1), 6) for r in b]
    assert a == b and a != c
    assert sorted(a[:12]) == recs and sorted(a[12:]) == recs  # each epoch is a permutation
    assert a[:12] != a[12:] and a[:12] != recs  # shuffled, and differently each epoch


@pytest.mark.parametrize("stop", [1, 3, 7])
def test_sft_resume_mid_stream(stop):
    ex = make_examples(n=25)
    args = dict(seq_len=32, batch_size=3, seed=2, shard_index=0, shard_count=1, pad_id=PAD)
    it = sft_batches(ex, **args)  # forever: crosses epoch boundaries (25 examples ~ 6 batches/epoch)
    take(it, stop)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    rest = take(it, 12)
    it2 = sft_batches(ex, **args)
    it2.set_state(state)
    for x, y in zip(rest, take(it2, 12)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_sft_resume_finite_epochs():
    ex = make_examples(n=25)
    args = dict(seq_len=32, batch_size=2, seed=2, shard_index=0, shard_count=1, epochs=2, pad_id=PAD)
    it = sft_batches(ex, **args)
    take(it, 4)
    state = it.get_state()
    rest = drain(it)
    it2 = sft_batches(ex, **args)
    it2.set_state(state)
    rest2 = drain(it2)
    assert len(rest) == len(rest2) > 0
    for x, y in zip(rest, rest2):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    # 2 epochs: every example exactly twice over the whole run
    ks = [k for b in drain(sft_batches(ex, **args)) for k, _ in unpack(b, 32)]
    assert sorted(ks) == sorted(list(range(25)) * 2)


def test_questions_resume_at_epoch_boundary():
    from mtr_jax.data.loaders import load_records

    fix = pathlib.Path(__file__).parent / "fixtures" / "data" / "bamboogle" / "test.jsonl"
    recs = load_records("bamboogle", str(fix))  # 10 records
    args = dict(batch_size=5, seed=4, shard_index=0, shard_count=1)
    it = question_batches(recs, **args)
    first_epoch = [r.id for b in take(it, 2) for r in b]  # exactly one epoch
    state = json.loads(json.dumps(it.get_state()))
    rest = [[r.id for r in b] for b in take(it, 4)]
    it2 = question_batches(recs, **args)
    it2.set_state(state)
    assert [[r.id for r in b] for b in take(it2, 4)] == rest  # goes on into epoch 2, not stopped
    assert sorted(first_epoch) == sorted(rest[0] + rest[1]) == sorted(r.id for r in recs)
    # finite run: at the boundary of its last epoch it ends, and resumes as ended
    it = question_batches(recs, epochs=1, **args)
    take(it, 2)
    it2 = question_batches(recs, epochs=1, **args)
    it2.set_state(it.get_state())
    assert drain(it2) == []


def test_bad_inputs():
    with pytest.raises(MtrError, match="SFT example 1"):
        sft_batches([([1, 2], [1, 1]), ([1, 2, 3], [1])], 8, 2, shard_index=0, shard_count=1)
    with pytest.raises(MtrError, match="bad data shard 2 of 2"):
        sft_batches(make_examples(4), 8, 2, shard_index=2, shard_count=2)
    with pytest.raises(MtrError, match="shard 1 of 2 is empty"):
        question_batches([1], 1, shard_index=1, shard_count=2)
    with pytest.raises(MtrError, match="long"):
        sft_batches(make_examples(4), 8, 2, shard_index=0, shard_count=1, long="cut")
    it = question_batches(list(range(5)), 2, shard_index=0, shard_count=1)
    with pytest.raises(MtrError, match="state does not match"):
        it.set_state({"bogus": 1})


def test_nothing_left_after_drop():
    with pytest.raises(MtrError, match="no SFT example left"):
        sft_batches([([1] * 9, [1] * 9)], 8, 2, shard_index=0, shard_count=1, long="drop")
