"""Review of the worker's Kafka side (issue 11): each test is one finding, failing on the code under review.

The loop-level ones run the real Worker over fake Kafka (tests/fakes.py); the client-level ones use a
real kafka-python producer pointed at a port where nothing listens (no broker needed), which is how it
behaves while the broker is away.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from tests.fakes import DLQ, OUT, Harness, Retriable, TooLarge
from worker.clients import TP, Record
from worker.delivery import AtLeastOnce, Interrupted
from worker.kafka_python import BATCH_BYTES, KafkaPythonProducer, producer_throughput
from worker.tracker import OffsetTracker, Outgoing

GUARANTEES = ["at-least-once", "exactly-once"]


def _dead_port() -> int:
    """A local port where nothing listens: a broker that is away."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kafka_producer(**config) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=f"127.0.0.1:{_dead_port()}", api_version=(2, 8, 0), **config)


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_dead_letter_the_dlq_refuses_for_good_does_not_stop_the_partition(guarantee):
    """A dead letter over the DLQ's max.message.bytes (it carries 64 KiB of the value and every header) is
    REJECTED; `rejected_dead_letter` builds the same-sized dead letter for the same DLQ, which is rejected
    again, forever: the partition never commits past it and the in-flight cap fills (DESIGN: no record
    stops the stream)."""
    h = Harness(guarantee, max_batch_size=4, max_in_flight=32)
    h.publish(0, 3)
    h.broker.append("in", 0, b"k", b"{" + b"x" * 600)  # invalid JSON: a dead letter carrying 600 bytes of it
    h.publish(0, 3)
    # the DLQ's max.message.bytes, as the broker applies it
    h.producer.refuse = lambda topic, value: TooLarge("too large") if topic == DLQ and len(value) > 500 else None
    h.run_until_idle(60)
    assert h.outcomes()[(0, 3)] in ("invalid_json", "output_rejected")
    assert h.broker.committed[TP("in", 0)] == 7


def test_replacing_a_producer_with_sends_pending_leaves_the_old_one_running():
    """`_replace_producer` calls close(timeout_s=0); kafka-python's close() flushes first and flush(0) raises
    KafkaTimeoutError while any send is pending, before force_close: the adapter swallows it and the old
    producer (sender thread, sockets, buffers) lives on, its sends unanswered until their delivery timeout.
    Every replacement during an outage (each abort, abandon, every third failed round) leaks one."""
    producer = _kafka_producer(max_block_ms=200)
    answers: list[Exception] = []
    future, *_ = producer._accumulator.append(TopicPartition(OUT, 0), int(time.time() * 1000), b"k", b"v", [])
    future.add_errback(answers.append)  # a send handed to the producer, not yet answered
    KafkaPythonProducer(producer, transactional=False).close(timeout_s=0)
    producer._sender.join(2)
    try:
        assert not producer._sender.is_alive(), "the replaced producer's I/O thread still runs"
        assert answers, "its pending send was never answered, so it does not 'fail over to the retry path'"
    finally:
        producer._sender.force_close()
        producer._sender.join(2)


def test_a_transactional_producer_that_cannot_initialise_is_closed():
    """While the broker is away `make_producer` is retried with backoff (`_producer_ready`); each try builds a
    KafkaProducer whose init_transactions() raises, and nothing closes it: one leaked producer thread per
    try (about one every 5 s for the whole outage)."""
    producer = _kafka_producer(max_block_ms=200, transactional_id="review")
    with pytest.raises(KafkaError):
        KafkaPythonProducer(producer, transactional=True)
    producer._sender.join(2)
    try:
        assert not producer._sender.is_alive(), "the producer that failed to initialise still runs"
    finally:
        producer._sender.force_close()
        producer._sender.join(2)


def test_publishing_to_a_missing_topic_does_not_block_the_loop_for_each_message():
    """kafka-python's send() waits max_block_ms (1 s in worker/__main__.py) for a missing topic's metadata, for
    every message; `publish()` sends a whole round of every partition in one go (up to --max-in-flight, 2048).
    With the output topic missing (the 'refusal that passes' of issue 11) the loop blocks ~1 s per message:
    minutes without polling, /healthz fails after 30 s, max.poll.interval.ms (300 s) expels the member.
    Here: 20 messages, max_block_ms 100 ms."""
    tracker = OffsetTracker()
    tp = TP("in", 0)
    epoch = tracker.open(tp)
    for offset in range(20):
        record = Record(tp, offset, b"k", b"{}", [], 0)
        tracker.add(record)
        tracker.complete(tp, epoch, offset, Outgoing(record, "missing-topic", b"{}", "positive", is_result=True))
    producer = _kafka_producer(max_block_ms=100)
    delivery = AtLeastOnce(lambda: KafkaPythonProducer(producer, transactional=False), None, tracker, DLQ,
                           lambda _message: None, lambda: None, commit_interval_s=0.1)
    try:
        started = time.monotonic()
        delivery.publish()
        blocked = time.monotonic() - started
    finally:
        producer._sender.force_close()
        producer._sender.join(2)
    assert blocked < 0.5, f"one publish() blocked the loop {blocked:.1f} s (one max_block_ms per message)"


def test_the_loop_does_not_spin_while_it_waits_for_answers_at_the_in_flight_cap():
    """At the in-flight cap with nothing on the device (waiting for acks, or holding a partition in retry
    backoff during an outage), `_idle_wait()` is 0 and no poll blocks: `step()` spins at 100 % of a core
    (~30,000 steps a second here) for as long as the broker takes to answer."""
    h = Harness("at-least-once", max_batch_size=8, max_in_flight=16)
    h.publish(0, 100)
    h.step(4, answer=False)  # 16 records in hand, all sent, none answered
    assert h.worker._room() <= 0 and not h.inference.busy
    steps, started = 0, time.monotonic()
    while time.monotonic() - started < 0.5:
        h.worker.step()
        steps += 1
    assert steps < 200, f"{steps} loop steps in 0.5 s while waiting for the broker"


def test_a_second_signal_ends_an_exactly_once_drain_waiting_for_answers():
    """`ExactlyOnce._commit` waits in `_await_answers` for every answer up to the transaction timeout (10 s,
    and kafka-python's commit_transaction() has no timeout at all) without looking at the second signal,
    which DESIGN says ends the drain at once. (Here the harness clock stands still, so the wait is endless;
    in production it is up to 10 s per transaction the flush redoes.)"""
    h = Harness("exactly-once", max_batch_size=4, max_in_flight=64)
    h.publish(0, 16)
    h.step(2, answer=False)
    h.producer.flush = lambda timeout_s: None  # the broker does not answer
    h.worker.request_stop()
    outcome: list[BaseException] = []

    def drain() -> None:
        try:
            h.worker.drain()
        except BaseException as err:  # noqa: BLE001 - the outcome is checked below
            outcome.append(err)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    time.sleep(0.3)
    h.worker.request_stop()  # the second signal
    thread.join(2)
    ended = not thread.is_alive()
    h.now += 3600  # let the stuck wait time out, so the thread ends
    thread.join(5)
    assert ended, "the second signal did not end the drain"
    assert outcome and isinstance(outcome[0], Interrupted)


def test_a_late_refusal_of_a_revoked_partitions_send_does_not_mark_an_idle_worker_unready():
    """`AtLeastOnce._settle` calls `_refused(err)` (which sets `refusing_since`) before asking the tracker whether
    the answer still counts. A send of a partition revoked since (or of a replaced producer, answered at its
    delivery timeout) failing late marks a caught-up worker as refusing; nothing resets it until the next
    successful send, so on a quiet topic /readyz turns 503 after 60 s and stays there."""
    h = Harness("at-least-once", max_batch_size=8, max_in_flight=64)
    h.publish(1, 4)
    h.step(4, answer=False)  # partition 1's results sent, not answered
    held = list(h.producer.waiting)
    assert held
    h.producer.waiting.clear()
    h.kafka.rebalance({0})  # partition 1 moves to another worker
    h.step(3)
    for *_message, on_done in held:  # their late answers: the old leader went away
        on_done(Retriable("NotLeaderForPartitionError"))
    h.step(3)
    assert not len(h.worker.tracker)
    assert h.worker.health.refusing_since is None, "an idle worker whose sends all count is marked as refusing"


def test_producer_batches_stay_below_the_smallest_known_topic_limit():
    """256 KiB batches where the output topics take them; kafka-python's 16 KiB while a limit is unknown (a
    bigger batch than the topic takes is split and retried by the client)."""
    assert producer_throughput()["batch_size"] == BATCH_BYTES
    assert producer_throughput([1_048_588, 1_048_588])["batch_size"] == BATCH_BYTES
    assert producer_throughput([1_048_588, 100_000])["batch_size"] == 100_000 - 512
    assert producer_throughput([1_048_588, None])["batch_size"] == 16_384
    assert producer_throughput()["partitioner"] is not producer_throughput()["partitioner"]  # one per producer
