"""Offsets: results leave in partition order; only acknowledged offsets become committable."""

from kafka import TopicPartition

from worker.tracker import OffsetTracker, Outgoing

TP = TopicPartition("reviews", 0)
TP1 = TopicPartition("reviews", 1)


def message(tp, offset):
    return Outgoing(tp, offset, "out", None, b"v", [], 0, "positive", True)


def test_release_waits_for_earlier_offsets_of_the_same_partition():
    tracker = OffsetTracker()
    for offset in (10, 11, 12):
        tracker.add(TP, offset)
    tracker.add(TP1, 5)
    tracker.complete(message(TP, 12))
    tracker.complete(message(TP1, 5))
    assert [(m.tp, m.offset) for m in tracker.release()] == [(TP1, 5)]
    tracker.complete(message(TP, 10))
    tracker.complete(message(TP, 11))
    assert [m.offset for m in tracker.release()] == [10, 11, 12]
    assert tracker.release() == []


def test_commit_position_stops_at_first_unacknowledged():
    tracker = OffsetTracker()
    for offset in (0, 1, 2):
        tracker.add(TP, offset)
        tracker.complete(message(TP, offset))
    tracker.release()
    tracker.acked(TP, 1)
    assert tracker.positions() == {}
    tracker.acked(TP, 0)
    assert tracker.positions() == {TP: 2}
    assert tracker.positions() == {}  # unchanged positions are not committed again
    tracker.acked(TP, 2)
    assert tracker.positions() == {TP: 3} and len(tracker) == 0


def test_transaction_acknowledges_everything_sent():
    tracker = OffsetTracker()
    for offset in (7, 8, 9):
        tracker.add(TP, offset)
    tracker.complete(message(TP, 7))
    tracker.complete(message(TP, 8))
    tracker.release()
    tracker.acked_all_sent()
    assert tracker.positions() == {TP: 9} and len(tracker) == 1


def test_records_and_bytes_held_are_counted_until_acknowledged():
    tracker = OffsetTracker()
    tracker.add(TP, 0, size=100)
    tracker.add(TP1, 0, size=50)
    assert (len(tracker), tracker.bytes) == (2, 150)
    tracker.complete(message(TP, 0))
    tracker.release()
    tracker.acked(TP, 0)
    tracker.positions()
    assert (len(tracker), tracker.bytes) == (1, 50)
    tracker.forget([TP1])
    assert (len(tracker), tracker.bytes) == (0, 0)
