"""Token-budget batching: caps hold, batches are length-sorted, the oldest record is served first."""

import random

from hypothesis import given
from hypothesis import strategies as st

from worker.batcher import STARVATION_S, BatchCaps, Pending, next_batch, padded_tokens


def pending(length, arrived=0.0, n=[0]):  # noqa: B006 - a counter for unique keys
    n[0] += 1
    return Pending(("tp", n[0]), [1] * length, arrived)


CAPS = BatchCaps(max_size=4, max_tokens=64, max_wait_s=0.025)


def test_size_cap_closes_a_batch_at_once():
    pool = [pending(5) for _ in range(6)]
    batch = next_batch(pool, CAPS, now=0.0)
    assert batch is not None and len(batch) == 4


def test_token_cap_counts_padding():
    pool = [pending(10), pending(30), pending(31)]
    batch = next_batch(pool, CAPS, now=0.0)
    assert batch is not None and padded_tokens(batch) <= 64 and len(batch) == 2


def test_partial_batch_waits_for_max_wait():
    pool = [pending(5, arrived=1.0)]
    assert next_batch(pool, CAPS, now=1.01) is None
    assert next_batch(pool, CAPS, now=1.026) == pool


def test_batches_are_contiguous_in_length_order():
    rng = random.Random(0)
    pool = [pending(rng.randint(3, 60)) for _ in range(40)]
    batch = next_batch(pool, BatchCaps(max_size=8, max_tokens=10_000, max_wait_s=0), now=1.0)
    low, high = min(p.length for p in batch), max(p.length for p in batch)
    assert len(batch) == 8
    assert all(p.length <= low or p.length >= high for p in pool if p not in batch)


def test_oldest_record_is_served_first():
    old = pending(50, arrived=0.0)
    pool = [pending(4, arrived=1.0) for _ in range(8)] + [old]
    batch = next_batch(pool, CAPS, now=1.0)
    assert old in batch


@given(st.lists(st.integers(1, 64), min_size=1, max_size=200), st.integers(1, 16), st.integers(64, 512))
def test_caps_always_hold_and_every_record_is_served(lengths, size, tokens):
    caps = BatchCaps(size, tokens, 0.0)
    pool = [pending(n) for n in lengths]
    served = 0
    while pool:
        batch = next_batch(pool, caps, now=1.0)
        assert batch and len(batch) <= size and padded_tokens(batch) <= tokens
        served += len(batch)
        pool = [p for p in pool if p not in batch]
    assert served == len(lengths)


def test_busy_device_gets_closed_batches_first_but_the_oldest_never_starves():
    old = pending(20, arrived=0.0)  # alone in its length range: a partial batch
    fresh = [pending(4, arrived=0.1) for _ in range(4)]  # one full batch
    pool = [old, *fresh]
    assert next_batch(pool, CAPS, now=0.1, device_busy=True) == fresh
    assert next_batch([old], CAPS, now=0.1, device_busy=True) is None
    assert next_batch([old], CAPS, now=CAPS.max_wait_s + STARVATION_S, device_busy=True) == [old]
    assert next_batch([old], CAPS, now=0.1, device_busy=False) == [old]


def test_ties_in_arrival_time_are_served_in_arrival_order():
    """Records of one poll arrive together; the first of them (lowest offset) must not wait behind the rest."""
    pool = [Pending(("tp", i), [1] * length, 0.0, seq=i) for i, length in enumerate([40, 3, 3, 3, 3, 3, 3, 3, 3])]
    batch = next_batch(pool, CAPS, now=1.0, device_busy=True)
    assert pool[0] in batch
