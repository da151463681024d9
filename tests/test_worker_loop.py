"""The worker's loop over fake Kafka (tests/fakes.py), step by step, with scripted rebalances and
refusals; after every step the delivery invariants are checked: a commit position c means every
offset below c was published, commits never move back, each partition's results appear in offset
order, and exactly-once publishes nothing twice."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from contract.cli import UserError
from tests.fakes import DLQ, IN, OUT, Fenced, Harness, Retriable, TooLarge, fake_forward, fake_tokenize
from worker.clients import TP

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
    h.check()
    everything_classified(h)
    assert len(h.broker.commit_history) - commits_before >= 3  # not one commit at the very end


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
