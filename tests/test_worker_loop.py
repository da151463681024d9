"""The worker's loop over fake Kafka (tests/fakes.py), step by step, with scripted rebalances and
refusals; after every step the delivery invariants are checked: a commit position c means every
offset below c was published, commits never move back, each partition's results appear in offset
order, and exactly-once publishes nothing twice."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from kafka.errors import GroupAuthorizationFailedError, KafkaConnectionError, KafkaTimeoutError

from contract.cli import UserError
from tests.fakes import DLQ, IN, OUT, Fenced, Harness, Retriable, TooLarge, fake_forward, fake_tokenize
from worker.clients import TP
from worker.delivery import UNANSWERED_LIMIT_S
from worker.kafka_python import POLL_FAILING_LIMIT_S

GUARANTEES = ["at-least-once", "exactly-once"]


def everything_classified(h: Harness) -> None:
    outcomes = h.outcomes()
    assert set(outcomes) == h.inputs()
    for partition in (0, 1):
        end = len(h.broker.logs[("in", partition)])
        if end:
            assert h.broker.committed[TP("in", partition)] == end


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_backlog_is_classified_and_committed(guarantee):
    h = Harness(guarantee, max_batch_size=8, max_in_flight=32)
    h.publish(0, 60)
    h.publish(1, 45)
    h.run_until_idle()
    everything_classified(h)
    assert all(label in ("positive", "negative") for label in h.outcomes().values())


@pytest.mark.parametrize("guarantee", GUARANTEES)
@pytest.mark.parametrize("same_poll", [True, False])
def test_rebalance_with_the_fetch_position_ahead(guarantee, same_poll):
    """kafka-python keeps fetch positions across an eager rebalance: the poll that completes it returns
    records from the old position while the committed offset lies behind. None of them may jump ahead."""
    h = Harness(guarantee, max_batch_size=8, max_in_flight=64)
    h.publish(0, 200)
    h.publish(1, 200)
    h.step(3, answer=False)  # results in flight, nothing committed yet
    h.kafka.rebalance({0, 1}, same_poll=same_poll)
    h.step(2, answer=False)
    h.kafka.rebalance({1}, same_poll=same_poll)
    h.step(3)
    h.kafka.rebalance({0, 1}, same_poll=same_poll)
    h.run_until_idle()
    everything_classified(h)


def test_a_rebalance_while_paused_at_the_in_flight_cap_resumes_fetching():
    """kafka-python keeps a partition's pause across a rebalance: the worker must not assume a resume."""
    h = Harness("at-least-once", max_batch_size=8, max_in_flight=16)
    h.publish(0, 100)
    h.publish(1, 100)
    h.step(3, answer=False)
    h.worker.last_poll -= 2  # a keepalive poll is due: at the cap it pauses every partition
    h.step(answer=False)
    assert h.kafka.paused()
    h.kafka.rebalance({0, 1})
    h.worker.last_poll -= 2  # the rebalance completes in a keepalive poll, made at the cap
    h.step()
    h.kafka.rebalance({0})
    h.step(10)
    h.kafka.rebalance({0, 1})
    h.run_until_idle()
    everything_classified(h)


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_polls_failing_while_the_broker_is_away_lose_no_rebalance(guarantee):
    """kafka-python raises retriable errors from poll while the broker is away, also from the poll whose
    listeners just ran: the worker keeps going, and those events come with that failed poll (the group has
    moved on: nothing more may be published or committed for a partition given away)."""
    h = Harness(guarantee, max_batch_size=8, max_in_flight=1000)  # room left: every step polls
    h.publish(0, 100)
    h.publish(1, 100)
    h.step(3, answer=False)
    h.kafka.failures += [KafkaConnectionError("socket disconnected"), KafkaTimeoutError("coordinator")]
    h.kafka.rebalance({1})
    h.step(answer=False)
    assert h.worker.tracker.partitions() == {TP(IN, 1)}
    h.step(3)
    h.kafka.failures.append(KafkaConnectionError("111 ECONNREFUSED"))
    h.kafka.rebalance({0, 1})
    h.run_until_idle()
    everything_classified(h)


def test_exactly_once_commits_nothing_for_a_partition_given_away_in_a_failed_poll():
    h = Harness("exactly-once", max_batch_size=8, max_in_flight=1000, commit_interval_ms=5000)
    h.publish(0, 10)
    h.step(2)
    h.kafka.failures += [KafkaConnectionError("socket disconnected")] * 6
    h.kafka.rebalance({1})
    h.step(6)
    assert TP(IN, 0) not in h.broker.committed


def test_polls_failing_for_minutes_end_the_worker():
    """A worker that polls nothing for POLL_FAILING_LIMIT_S ends, rather than look alive; its replacement starts
    clean."""
    h = Harness("at-least-once")
    h.publish(0, 10)
    h.kafka.failures += [KafkaConnectionError("socket disconnected")] * 3
    h.step()
    h.worker.consumer._failing_since -= POLL_FAILING_LIMIT_S + 1
    with pytest.raises(KafkaConnectionError):
        h.step()


def test_a_poll_error_that_is_not_retriable_stops_the_worker():
    h = Harness("at-least-once")
    h.publish(0, 10)
    h.kafka.failures.append(GroupAuthorizationFailedError("not allowed"))
    with pytest.raises(GroupAuthorizationFailedError):
        h.step(3)


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_batch_on_the_device_across_revoke_and_reassign_is_dropped(guarantee):
    gate = threading.Event()
    calls = []

    def slow_forward(ids):
        calls.append(len(ids))
        gate.wait(5)
        return fake_forward(ids)

    h = Harness(guarantee, forward=slow_forward, max_batch_size=16, max_in_flight=64)
    h.publish(0, 40)
    for _ in range(5):  # join, poll, and the first batch goes to the device and waits there
        h.worker.step()
        h.tokens()
        if h.inference.busy:
            break
    assert h.inference.busy
    h.kafka.rebalance({0, 1})
    h.worker.step()  # revoke and re-assign while the batch is on the device
    gate.set()
    h.run_until_idle()
    everything_classified(h)
    counts = {}
    for item in h.broker.published():
        counts[item["offset"]] = counts.get(item["offset"], 0) + 1
    if guarantee == "exactly-once":
        assert set(counts.values()) == {1}


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_poll_in_the_tokenizer_across_revoke_and_reassign_is_dropped(guarantee):
    """The tokenizer's thread still holds a poll when its partition is revoked and assigned again (re-fetched
    from the committed offset): the old poll's tokens join nothing, each record is published once."""
    gate = threading.Event()

    def slow_tokenize(texts):
        gate.wait(5)
        return fake_tokenize(texts)

    h = Harness(guarantee, tokenize=slow_tokenize, max_batch_size=16, max_in_flight=64)
    h.publish(0, 40)
    for _ in range(5):  # join and poll: the poll waits in the tokenizer
        h.worker.step()
        if h.worker.tokenizing.busy:
            break
    assert h.worker.tokenizing.busy
    h.kafka.rebalance({0, 1})
    h.worker.step()  # revoke and re-assign while the tokenizer holds the poll
    gate.set()
    h.run_until_idle()
    everything_classified(h)
    offsets = [item["offset"] for item in h.broker.published() if item["partition"] == 0]
    assert sorted(set(offsets)) == list(range(40))
    if guarantee == "exactly-once":
        assert len(offsets) == 40


def test_a_poll_larger_than_the_sort_window_goes_to_the_tokenizer_a_window_at_a_time_and_leaves_in_order():
    """A poll of 4196 records with a sort window of 4096 is tokenized as two jobs, so the first window's batches
    can reach the device before the rest is tokenized; the jobs come back in order, and so does the output."""
    sizes: list[int] = []

    def counting_tokenize(texts):
        sizes.append(len(texts))
        return fake_tokenize(texts)

    h = Harness("at-least-once", partitions=1, tokenize=counting_tokenize, max_batch_size=256, max_in_flight=8192)
    assert h.worker.pool.window == 4096
    h.publish(0, 4196)
    for _ in range(5):  # join, then poll all of it at once
        h.worker.step()
        if h.worker.tokenizing.busy:
            break
    assert h.worker.tokenizing.busy == 2
    h.run_until_idle()
    assert sizes == [4096, 100]
    everything_classified(h)
    assert [item["offset"] for item in h.broker.published()] == list(range(4196))


@pytest.mark.parametrize("same_poll", [True, False])
def test_at_least_once_commits_what_was_acknowledged_before_a_revoke(same_poll):
    """Results acknowledged since the last (paced) commit are committed in the revoke callback, while the
    worker still owns the partitions, so the next owner does not publish them again."""
    h = Harness("at-least-once", max_batch_size=8, max_in_flight=64, commit_interval_ms=3_600_000)
    h.publish(0, 20)
    h.publish(1, 12)
    for _ in range(30):
        h.step()
        if len(h.broker.published()) == 32 and not h.producer.waiting:
            break
    assert len(h.broker.published()) == 32 and not h.broker.committed  # acknowledged, no paced commit yet
    h.kafka.rebalance({0, 1}, same_poll=same_poll)
    h.step()
    assert h.kafka.revoke_commits == [{TP(IN, 0): 20, TP(IN, 1): 12}]
    h.publish(0, 4)
    h.step(20)  # (the paced commit never comes: these stay in hand)
    offsets = [(item["partition"], item["offset"]) for item in h.broker.published()]
    assert len(offsets) == len(set(offsets)) == 36  # nothing published twice


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_refusals_that_pass_are_retried_in_order_without_committing_past_them(guarantee):
    h = Harness(guarantee, max_batch_size=8, max_in_flight=32)
    h.publish(0, 30)
    h.producer.refuse = lambda topic, value: Retriable("leader moved") if topic == OUT else None
    h.step(12)
    assert TP("in", 0) not in h.broker.committed or h.broker.committed[TP("in", 0)] == 0
    assert h.worker.delivery.refusing_since is not None
    assert not h.broker.logs[(OUT, 0)]
    h.producer.refuse = lambda topic, value: None
    h.run_until_idle()
    everything_classified(h)
    assert h.worker.delivery.refusing_since is None


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_result_refused_for_good_becomes_an_output_rejected_dead_letter(guarantee):
    h = Harness(guarantee, max_batch_size=4, max_in_flight=32)
    h.publish(0, 20)
    h.producer.refuse = lambda topic, value: TooLarge("too large") if topic == OUT and b'"p0-7"' in value else None
    h.run_until_idle()
    everything_classified(h)
    outcomes = h.outcomes()
    assert outcomes[(0, 7)] == "output_rejected"
    assert sum(v == "output_rejected" for v in outcomes.values()) == 1
    dead = [i["body"] for i in h.broker.published() if i["topic_out"] == DLQ]
    assert dead[0]["source"]["offset"] == 7 and dead[0]["value_size"] > 0


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_result_over_the_topics_limit_is_dead_lettered_before_it_is_sent(guarantee):
    h = Harness(guarantee, max_batch_size=4, max_in_flight=32, limits={OUT: 400})
    h.publish(0, 12)
    h.broker.append("in", 0, b"k", json.dumps({"id": "big", "text": "fine", "notes": "n" * 300}).encode())
    sent: list[str] = []
    h.producer.refuse = lambda topic, value: sent.append(topic) or None
    h.run_until_idle()
    everything_classified(h)
    assert h.outcomes()[(0, 12)] == "output_rejected"
    assert sent.count(DLQ) == 1 and sent.count(OUT) == 12  # never offered to the output topic


def test_exactly_once_commit_failure_aborts_and_redoes_the_transaction():
    h = Harness("exactly-once", max_batch_size=8, max_in_flight=32)
    h.publish(0, 30)
    h.step(2)
    h.producer.commit_error = Retriable("coordinator moved")
    h.step()
    h.run_until_idle()
    everything_classified(h)


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_producer_that_cannot_be_made_while_the_broker_is_away_is_made_later(guarantee):
    h = Harness(guarantee, max_batch_size=8, max_in_flight=32)
    h.publish(0, 30)
    h.step(2)
    h.publish(0, 10)
    first = h.producer
    if guarantee == "exactly-once":
        first.commit_error = Retriable("the broker went away")
    else:
        first.refuse = lambda topic, value: Retriable("the broker went away")
    h.producer_failures = 3
    h.step(12)
    for producer in h.producers:
        producer.refuse = lambda topic, value: None
    assert h.producer_failures == 0  # every attempt counted, none crashed the loop
    h.run_until_idle()
    everything_classified(h)


def test_exactly_once_fenced_after_a_long_transaction_replaces_the_producer():
    h = Harness("exactly-once", max_batch_size=8, max_in_flight=32)
    h.publish(0, 30)
    h.step(2)
    h.publish(0, 10)
    first = h.producer
    first.commit_error = Fenced("epoch bumped by the coordinator")

    def broker_away_for_a_minute():
        h.now += 60  # the transaction outlived its timeout while the broker was away

    first.before_commit = broker_away_for_a_minute
    h.step(2)
    assert h.producer is not first and first.closed
    h.run_until_idle()
    everything_classified(h)


def test_exactly_once_fenced_by_another_live_instance_stops_in_one_line():
    h = Harness("exactly-once", max_batch_size=8, max_in_flight=32)
    h.publish(0, 30)
    h.step(2)
    h.publish(0, 10)
    h.producer.commit_error = Fenced("another producer with this id")
    with pytest.raises(UserError, match="another live worker"):
        h.step(2)


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_drain_commits_as_it_goes(guarantee):
    h = Harness(guarantee, max_batch_size=4, max_in_flight=64)
    h.publish(0, 64)
    h.step(2, answer=False)  # join, then poll the backlog
    assert len(h.worker.tracker) == 64
    h.producer.auto_answer = True
    commits_before = len(h.broker.commit_history)
    h.worker.stopping = True
    h.worker.drain()
    h.check(idle=True)
    everything_classified(h)
    assert len(h.broker.commit_history) - commits_before >= 3  # not one commit at the very end


def test_a_producer_that_answers_nothing_is_replaced_and_its_sends_go_out_again():
    """kafka-python's idempotent producer can wait for a producer id for good after a broker restart: its sends
    neither pass nor expire. After UNANSWERED_LIMIT_S the worker replaces it and sends them again; whatever the
    old one answers later no longer counts."""
    h = Harness("at-least-once", max_batch_size=8, max_in_flight=64)
    h.publish(0, 30)
    h.publish(1, 30)
    h.step(3)
    stuck = h.producer
    stuck.stuck = True
    h.publish(0, 20)
    h.step(int(UNANSWERED_LIMIT_S) - 5)
    assert h.producer is stuck and stuck.waiting
    h.step(10)
    assert h.producer is not stuck and stuck.closed and not stuck.waiting
    h.run_until_idle()
    everything_classified(h)


def test_a_send_the_client_gave_up_on_replaces_the_producer_at_once():
    """A retriable refusal reaches the worker only after the client's own retries and delivery timeout: the
    producer is replaced at once and its other unanswered sends fail over with it (kafka-python's expired one
    batch after a broker restart and never answered the rest, so the partitions waited for the watchdog)."""
    h = Harness("at-least-once", max_batch_size=8, max_in_flight=64)
    h.publish(0, 30)
    h.publish(1, 30)
    h.step(4, answer=False)
    first = h.producer
    assert len(first.waiting) > 1
    first.refuse = lambda topic, value: Retriable("Expiring 1 record(s): 20000 ms has passed since batch creation")
    first.answer(1)
    first.refuse = lambda topic, value: None
    h.step(answer=False)
    assert h.producer is not first and first.closed and not first.waiting
    h.run_until_idle()
    everything_classified(h)


def test_a_send_given_up_on_after_its_partition_moved_replaces_the_producer_too():
    """A broker restart often comes with a rebalance: the refused send may belong to an old epoch. It does not
    count for its partition, but it says the same of the producer."""
    h = Harness("at-least-once", max_batch_size=8, max_in_flight=64)
    h.publish(0, 30)
    h.publish(1, 30)
    h.step(4, answer=False)
    first = h.producer
    h.kafka.rebalance({0, 1})  # new epochs: every send waiting on `first` is stale
    h.step(answer=False)
    first.refuse = lambda topic, value: Retriable("Expiring 1 record(s)")
    first.answer(1)
    first.refuse = lambda topic, value: None
    first.stuck = True  # and it answers nothing more
    h.step(answer=False)
    assert h.producer is not first and first.closed
    assert h.worker.delivery.refusing_since is None  # a stale refusal is not an outage
    h.run_until_idle()
    everything_classified(h)


def test_a_drain_with_a_producer_that_answers_nothing_ends():
    h = Harness("at-least-once", max_batch_size=8, max_in_flight=64)
    h.publish(0, 40)
    h.step(2, answer=False)
    stuck = h.producer
    stuck.stuck = True
    h.step(2, answer=False)
    h.worker.stopping = True
    drain = threading.Thread(target=h.worker.drain, daemon=True)
    drain.start()
    for _ in range(2000):  # the drain's clock: a second every 10 ms
        drain.join(timeout=0.01)
        h.now += 1
    h.worker.interrupted = True  # ends a drain that hangs, so the test fails instead of hanging
    assert not drain.is_alive() and h.producer is not stuck
    h.check(idle=True)
    everything_classified(h)


def test_a_last_commit_the_broker_does_not_take_still_ends_the_drain(caplog):
    """At least once: the results stay published, the next owner publishes them again; the worker stops."""
    h = Harness("at-least-once", max_batch_size=8, max_in_flight=64, commit_interval_ms=10**9)  # one commit, last
    h.publish(0, 40)
    h.step(2, answer=False)
    h.producer.auto_answer = True
    h.kafka.commit_failures.append(KafkaTimeoutError("coordinator"))
    h.worker.stopping = True
    h.worker.drain()
    assert "the last commit failed (KafkaTimeoutError" in caplog.text
    assert not h.kafka.commit_failures and not h.producer.waiting
    h.check(idle=True)


def test_a_second_signal_ends_the_drain_without_committing():
    from worker.delivery import Interrupted

    h = Harness("at-least-once", max_batch_size=4, max_in_flight=64)
    h.publish(0, 64)
    h.step(2, answer=False)
    assert len(h.worker.tracker) == 64
    h.worker.request_stop()
    h.worker.request_stop()
    with pytest.raises(Interrupted):
        h.worker.drain()
    assert TP("in", 0) not in h.broker.committed or h.broker.committed[TP("in", 0)] == 0


def test_model_errors_are_dead_letters_and_the_rest_is_classified():
    boom, nan = (1000 + sum(map(ord, word)) % 1000 for word in ("boom", "nan"))

    def picky(ids):
        if any(boom in row for row in ids):
            raise RuntimeError("kernel failed on this row")
        scores = fake_forward(ids)
        scores[[i for i, row in enumerate(ids) if nan in row]] = np.nan
        return scores

    h = Harness("at-least-once", forward=picky, max_batch_size=16, max_in_flight=64)
    h.publish(0, 20)
    h.publish(0, 2, text="boom")  # two rows that always fail
    h.publish(0, 1, text="nan")  # a non-finite score, alone too
    h.run_until_idle()
    everything_classified(h)
    codes = [v for v in h.outcomes().values() if v not in ("positive", "negative")]
    assert codes == ["model_error"] * 3


def test_a_broken_device_stops_the_worker_with_nothing_committed_past_it():
    from worker.inference import DeviceBroken

    def broken(ids):
        raise RuntimeError("CUDA error: an illegal memory access")

    h = Harness("at-least-once", forward=broken, max_batch_size=8, max_in_flight=64)
    h.publish(0, 20)
    with pytest.raises(DeviceBroken):
        h.run_until_idle()
    assert not h.broker.logs[(DLQ, 0)] and not h.broker.logs[(OUT, 0)]
    assert h.broker.committed.get(TP("in", 0), 0) == 0


def test_a_tokenizer_answer_of_the_wrong_length_falls_back_to_one_text_at_a_time():
    """A batched answer with a row missing must not shift ids onto other records or stop the loop (as the
    synchronous `zip(..., strict=True)` guaranteed): the poll is tokenized again one text at a time."""

    def short_tokenize(texts):
        tokens = fake_tokenize(texts)
        return type(tokens)(ids=tokens.ids[:-1], truncated=tokens.truncated[:-1]) if len(texts) > 1 else tokens

    h = Harness("at-least-once", tokenize=short_tokenize, max_batch_size=8, max_in_flight=32)
    h.publish(0, 10)
    h.run_until_idle()
    everything_classified(h)
    assert set(h.outcomes().values()) <= {"positive", "negative"}  # no record lost to a dead letter
