"""Token-budget batching: caps hold, batches are length-sorted, the oldest record is served first."""

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.batcher import STARVATION_S, BatchCaps, BatchQueue, Pending, padded_tokens


def next_batch(pool, caps, now, device_busy=False):
    """What a queue holding `pool` serves first."""
    queue = BatchQueue(caps)
    queue.append(pool)
    return queue.take(now, device_busy)


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


def test_a_batch_ends_before_a_longer_record_whose_padding_costs_more_than_a_batch():
    """On a CPU a forward costs about its padded tokens: at moderate load, a pool of mixed lengths run as one batch
    padded half of it (p50 2.4 s at 50 % load in make bench's latency point); cut by cost it gave 0.25 s."""
    short, long = [pending(10, arrived=1.0) for _ in range(4)], pending(40, arrived=1.0)
    caps = BatchCaps(max_size=64, max_tokens=8192, max_wait_s=0.025, overhead_tokens=64)
    assert next_batch([*short, long], BatchCaps(64, 8192, 0.025), now=1.03) == [*short, long]  # caps alone
    queue = BatchQueue(caps)
    queue.append([*short, long])
    assert queue.take(now=1.0) == short  # 4 rows x 30 more tokens > 64: closed, so it goes without waiting
    assert queue.take(now=1.0) is None  # the long one is a last, partial batch: it waits
    assert queue.take(now=1.03) == [long]
    assert next_batch([*short, pending(20, arrived=1.0)], caps, now=1.0) is None  # 4 x 10 <= 64: one batch, waiting


def test_oldest_record_is_served_first():
    old = pending(50, arrived=0.0)
    pool = [pending(4, arrived=1.0) for _ in range(8)] + [old]
    batch = next_batch(pool, CAPS, now=1.0)
    assert old in batch


def greedy_cut(pool, caps):
    """The batches of the plain greedy rule, one row at a time: the queue's bisection must find the same."""
    batches, current = [], []
    for p in sorted(pool, key=lambda p: p.length):
        padding = len(current) * (p.length - current[-1].length) if current else 0
        if current and (len(current) + 1 > caps.max_size or (len(current) + 1) * p.length > caps.max_tokens
                        or (caps.overhead_tokens is not None and padding > caps.overhead_tokens)):
            batches.append(current)
            current = []
        current.append(p)
    return batches + [current] if current else batches


OVERHEAD = st.one_of(st.none(), st.integers(0, 200))


@given(st.lists(st.lists(st.integers(1, 64), min_size=1, max_size=60), min_size=1, max_size=5),
       st.integers(1, 16), st.integers(64, 512), OVERHEAD, st.randoms())
def test_caps_always_hold_and_every_record_is_served_once(chunks, size, tokens, overhead, rng):
    """Appends between takes, as polls arrive while batches leave: every record once, within the caps, each batch
    one of the greedy cut of what was waiting."""
    caps = BatchCaps(size, tokens, 0.0, overhead)
    queue, waiting, served = BatchQueue(caps), [], []
    for lengths in chunks:
        fresh = [pending(n) for n in lengths]
        queue.append(fresh)
        waiting += fresh
        for _ in range(rng.randint(0, 3)):
            batch = queue.take(now=1.0)
            if batch is None:
                break
            assert batch in greedy_cut(waiting, caps)
            assert len(batch) <= size and padded_tokens(batch) <= tokens
            waiting = [p for p in waiting if p not in batch]
            served += batch
    while batch := queue.take(now=1.0):
        served += batch
    assert len(queue) == 0
    assert len(served) == sum(map(len, chunks)) == len({p.key for p in served})


def test_dropped_partitions_leave_the_queue_and_the_deadline_follows_the_oldest():
    queue = BatchQueue(CAPS)
    kept, gone = Pending(("a", 1), [1] * 5, 2.0), Pending(("b", 1), [1] * 5, 1.0)
    queue.append([kept, gone])
    assert queue.deadline() == 1.0 + CAPS.max_wait_s
    queue.drop({"b"})
    assert len(queue) == 1 and queue.deadline() == 2.0 + CAPS.max_wait_s
    assert queue.take(now=2.01) is None and queue.take(now=2.01, force=True) == [kept]
    assert queue.deadline() is None


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


def test_after_a_take_the_new_last_batch_is_closed_only_if_nothing_could_join_it():
    """Found by review: the batch before a taken last one kept the closed flag it had only because a longer
    record followed, and went without its wait."""
    caps = BatchCaps(max_size=10, max_tokens=10, max_wait_s=0.025)
    queue = BatchQueue(caps)
    short, long = Pending(("tp", 1), [1], 1.0), Pending(("tp", 2), [1] * 10, 0.0)
    queue.append([short, long])
    assert queue.take(now=1.0) == [long]  # the oldest, closed by the token cap
    assert queue.take(now=1.001) is None  # [short] waits, as in a fresh queue
    assert queue.take(now=1.03) == [short]  # its wait passed


@given(st.lists(st.tuples(st.integers(1, 40), st.floats(0, 1)), min_size=1, max_size=80), st.integers(1, 8),
       st.integers(40, 200), OVERHEAD, st.floats(0, 1.5), st.booleans())
def test_a_queue_after_takes_decides_as_a_fresh_queue_of_what_is_left(records, size, tokens, overhead, now, busy):
    caps = BatchCaps(size, tokens, 0.3, overhead)
    queue = BatchQueue(caps)
    queue.append(Pending(("tp", i), [1] * n, arrived, seq=i) for i, (n, arrived) in enumerate(records))
    while True:
        fresh = BatchQueue(caps)
        fresh.append(list(queue._items))
        expected, batch = fresh.take(now, busy), queue.take(now, busy)
        assert batch == expected
        if batch is None:
            break


def test_a_window_sorts_only_the_oldest_records_and_admits_the_next_in_arrival_order():
    """Results leave in partition order, so a sort over everything in hand releases nothing until its last batch is
    done (the worker ran in waves); a window sorts the oldest few batches' worth, later records wait their turn."""
    rng = random.Random(1)
    caps = BatchCaps(max_size=4, max_tokens=10_000, max_wait_s=0)
    records = [pending(rng.randint(3, 60), arrived=float(i)) for i in range(30)]
    queue = BatchQueue(caps, window=8)
    queue.append(records[:20])
    queue.append(records[20:])
    assert len(queue) == 30
    taken: list[Pending] = []
    while len(queue):
        admitted = records[:min(30, len(taken) + 8)]  # the window: the oldest 8 not yet taken
        batch = queue.take(now=100.0)
        assert batch and set(map(id, batch)) <= set(map(id, admitted)), "a batch took a record beyond the window"
        assert [p.length for p in batch] == sorted(p.length for p in batch)
        taken += batch
    assert sorted(map(id, taken)) == sorted(map(id, records))  # each record once


def test_dropping_a_partition_empties_it_beyond_the_window_too():
    caps = BatchCaps(max_size=4, max_tokens=10_000, max_wait_s=0)
    records = [Pending((f"tp{i % 2}", i), [1] * (3 + i % 5), float(i), seq=i) for i in range(20)]
    queue = BatchQueue(caps, window=4)
    queue.append(records)
    queue.drop({"tp0"})
    assert len(queue) == 10
    taken = []
    while batch := queue.take(now=100.0):
        taken += batch
    assert sorted(p.key[1] for p in taken) == list(range(1, 20, 2))


def test_a_window_admits_a_quarter_at_a_time_and_holds_a_record_at_least():
    """Each admission sorts and cuts the window again: it waits for a quarter of the window to be free."""
    caps = BatchCaps(max_size=1, max_tokens=10_000, max_wait_s=0)
    queue = BatchQueue(caps, window=8)
    queue.append([pending(5, arrived=float(i)) for i in range(20)])
    assert len(queue._items) == 8
    queue.take(now=100.0)  # one free: under a quarter, nothing joins
    assert len(queue._items) == 7 and len(queue) == 19
    queue.take(now=100.0)  # two free: a quarter, the window fills again
    assert len(queue._items) == 8 and len(queue) == 18
    for bad in (0, -1):
        with pytest.raises(ValueError, match="at least one record"):
            BatchQueue(caps, window=bad)
