"""ActivationStore: kept positions, shuffling determinism, leftover dropping, first_buffer and exact resume."""

from __future__ import annotations

import pytest
import torch

from domain_sae.activations.live import (ActivationSourceError, ActivationStore, SourceExhaustedError,
                                          StoreStateError, refill_seed)
from training_helpers import FakeTokenStream, PlainStream, kept_rows, make_activation_fn

D = 6


def make_store(stream=None, *, seed=3, batch=10, buffer=45, mbs=2, exclude_special=True, fn=None):
    stream = stream if stream is not None else FakeTokenStream()
    return ActivationStore(fn or make_activation_fn(D), stream, d_in=D, batch_size=batch, buffer_tokens=buffer,
                           model_batch_size=mbs, exclude_special=exclude_special, seed=seed)


def expected_refill(stream, fn, start_seq, buffer, mbs, exclude_special=True):
    """Independent model of one refill: read chunks of mbs sequences until >= buffer positions are kept."""
    stop = start_seq
    n = 0
    while n < buffer and stop < stream.n_sequences:
        chunk_stop = min(stop + mbs, stream.n_sequences)
        n += kept_rows(stream, fn, stop, chunk_stop, exclude_special)[0].shape[0]
        stop = chunk_stop
    return kept_rows(stream, fn, start_seq, stop, exclude_special)[0], stop


def test_first_refill_is_seeded_permutation_of_kept_positions_with_leftover_dropped():
    fn = make_activation_fn(D)
    stream = FakeTokenStream()
    store = make_store(stream, fn=fn)
    acts, stop = expected_refill(stream, fn, 0, 45, 2)
    n = acts.shape[0]
    assert n >= 45
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(refill_seed(3, 0)))
    n_batches = n // 10
    served = torch.cat([next(store) for _ in range(n_batches)])
    assert served.dtype == torch.float32 and served.shape == (n_batches * 10, D)
    torch.testing.assert_close(served, acts[perm][:n_batches * 10], rtol=0, atol=0)
    assert store.tokens_served == n_batches * 10
    assert store.sequences_consumed == stop
    # the next batch comes from the second refill, which starts right after the first one's sequences
    acts2, _ = expected_refill(stream, fn, stop, 45, 2)
    perm2 = torch.randperm(acts2.shape[0], generator=torch.Generator().manual_seed(refill_seed(3, 1)))
    torch.testing.assert_close(next(store), acts2[perm2][:10], rtol=0, atol=0)


def test_special_and_padding_positions_never_served():
    # activation = one-hot of the segment code shifted by 1 (pad -1 -> 0, special 0 -> 1, ...)
    stream = FakeTokenStream(n_sequences=30)

    def seg_fn(ids):
        b, t = ids.shape
        out = torch.zeros(b, t, D)
        for i in range(b):
            seq = int(((ids[i, 0]) * pow(7, -1, 97)) % 97)  # recover the sequence index from the first id
            out[i, torch.arange(t), stream.sequence(seq)[1].long() + 1] = 1.0
        return out

    kept_codes = set()
    for st in (make_store(stream, fn=seg_fn), make_store(stream, fn=seg_fn, exclude_special=False)):
        codes = set()
        try:
            while True:
                codes |= set((next(st).argmax(1) - 1).tolist())
        except StopIteration:
            pass
        kept_codes.add(frozenset(codes))
        assert -1 not in codes
    assert frozenset({1, 2, 3}) in kept_codes and frozenset({0, 1, 2, 3}) in kept_codes


def test_same_seed_same_batches_other_seed_differs():
    a = [next(make_store(seed=5)) for _ in range(1)]
    s1, s2, s3 = make_store(seed=5), make_store(seed=5), make_store(seed=6)
    b1 = torch.cat([next(s1) for _ in range(8)])
    b2 = torch.cat([next(s2) for _ in range(8)])
    b3 = torch.cat([next(s3) for _ in range(8)])
    assert torch.equal(b1, b2) and torch.equal(a[0], b1[:10])
    assert not torch.equal(b1, b3)


@pytest.mark.parametrize("n_before", [0, 1, 3, 4, 5, 7])
@pytest.mark.parametrize("stream_cls", [FakeTokenStream, PlainStream])
def test_exact_resume_from_state_dict(n_before, stream_cls):
    ref = make_store(stream_cls())
    for _ in range(n_before):
        next(ref)
    state = ref.state_dict()
    rest = [next(ref) for _ in range(6)]

    resumed = make_store(stream_cls())
    resumed.load_state_dict(dict(state))
    assert resumed.tokens_served == state["tokens_served"]
    for expected in rest:
        assert torch.equal(next(resumed), expected)
    assert resumed.state_dict() == ref.state_dict()


def test_resume_uses_skip_when_available():
    ref = make_store()
    for _ in range(7):
        next(ref)
    state = ref.state_dict()
    assert state["batches_served"] > 0 and state["refill_index"] >= 1  # mid-refill, not the first one
    stream = FakeTokenStream()
    resumed = make_store(stream)
    resumed.load_state_dict(state)
    assert stream.skipped_with_skip == state["sequences_before_refill"] > 0
    assert torch.equal(next(resumed), next(ref))


def test_first_buffer_then_trained_once():
    store = make_store()
    first = store.first_buffer()
    n_batches = first.shape[0] // 10
    served = torch.cat([next(store) for _ in range(n_batches)])
    torch.testing.assert_close(served, first[:n_batches * 10], rtol=0, atol=0)  # served in the same order, once
    nxt = next(store)
    assert not any(torch.equal(nxt[0], row) for row in first)  # the next batch is fresh data
    with pytest.raises(StoreStateError):
        store.first_buffer()


def test_state_after_first_buffer_restores_same_refill():
    store = make_store()
    store.first_buffer()
    state = store.state_dict()
    assert state["refill_index"] == 0 and state["batches_served"] == 0
    b = next(store)
    other = make_store()
    other.first_buffer()
    other.load_state_dict(state)  # the refill in memory is the saved one: no rewind needed
    assert torch.equal(next(other), b)


def test_exhaustion_and_errors():
    store = make_store(FakeTokenStream(n_sequences=4), buffer=10)
    got = 0
    with pytest.raises(SourceExhaustedError, match="ran out of data"):
        while True:
            store.next_batch()
            got += 1
    assert got >= 1
    with pytest.raises(ActivationSourceError, match="smaller than one batch"):
        make_store(batch=10, buffer=5)
    bad = make_store(fn=lambda ids: torch.zeros(*ids.shape, D + 1))
    with pytest.raises(ActivationSourceError, match="d_in"):
        next(bad)
    used = make_store()
    for _ in range(8):
        next(used)
    with pytest.raises(StoreStateError, match="rewind"):
        used.load_state_dict({"sequences_before_refill": 0, "refill_index": 0, "batches_served": 1})
