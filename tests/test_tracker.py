"""The offset tracker: partition order, epochs, send rounds and commit positions."""

from worker.clients import TP, Record, Refusal
from worker.tracker import OffsetTracker, Outgoing, State

P = TP("in", 0)


def rec(offset: int, tp: TP = P) -> Record:
    return Record(tp, offset, None, b"v", [], 0)


def ready(tracker: OffsetTracker, epoch: int, offset: int, tp: TP = P) -> bool:
    return tracker.complete(tp, epoch, offset, Outgoing(rec(offset, tp), "out", b"x", "positive", True))


def test_release_keeps_offset_order_and_waits_for_earlier_offsets():
    t = OffsetTracker()
    epoch = t.open(P)
    for offset in (10, 11, 12):
        t.add(rec(offset))
    ready(t, epoch, 11)
    ready(t, epoch, 12)
    assert t.release(0, one_round=False) == []  # 10 is still on the device
    ready(t, epoch, 10)
    assert [e.record.offset for e in t.release(0, one_round=False)] == [10, 11, 12]


def test_work_of_an_older_epoch_never_completes_the_new_one():
    t = OffsetTracker()
    old = t.open(P)
    t.add(rec(5))
    new = t.open(P)  # revoked and assigned again: the same offset is fetched again
    t.add(rec(5))
    assert not ready(t, old, 5)
    assert t.entry(P, new, 5).state is State.WAITING
    assert ready(t, new, 5)


def test_one_round_at_a_time_and_a_failed_round_is_sent_again_from_its_first_failure():
    t = OffsetTracker()
    epoch = t.open(P)
    for offset in range(4):
        t.add(rec(offset))
        ready(t, epoch, offset)
    sent = t.release(0, one_round=True)
    t.add(rec(4))
    ready(t, epoch, 4)
    assert t.release(0, one_round=True) == []  # the first round is not answered yet
    t.answered(P, epoch, 0, 1, None, "")
    t.answered(P, epoch, 1, 1, Refusal.RETRY, "timeout")
    t.answered(P, epoch, 2, 1, None, "")  # acknowledged after an earlier failure
    assert t.failed_rounds() == []  # offset 3 not answered yet
    t.answered(P, epoch, 3, 1, None, "")
    assert t.release(0, one_round=True) == []  # a failed round is dealt with first
    [(tp, again)] = t.failed_rounds()
    assert [e.record.offset for e in again] == [1, 2, 3]
    assert [e.record.offset for e in t.release(0, one_round=True)] == [1, 2, 3, 4]
    assert len(sent) == 4 and t.commit_positions() == {P: 1}


def test_commit_positions_move_forward_only_and_a_failed_commit_is_offered_again():
    t = OffsetTracker()
    epoch = t.open(P)
    for offset in range(3):
        t.add(rec(offset))
        ready(t, epoch, offset)
    t.release(0, one_round=False)
    assert t.commit_positions() == {}
    assert t.commit_positions(include_sent=True) == {P: 3}  # exactly-once: in the transaction
    for offset in range(2):
        t.answered(P, epoch, offset, 1, None, "")
    assert t.commit_positions() == {P: 2}
    t.committing({P: 2})
    assert len(t) == 1 and t.commit_positions() == {}
    t.commit_failed({P: 2})
    assert t.commit_positions() == {P: 2}


def test_an_idle_partition_commits_the_consumer_position_past_transaction_markers():
    t = OffsetTracker()
    epoch = t.open(P)
    t.add(rec(7))
    ready(t, epoch, 7)
    t.release(0, one_round=False)
    t.answered(P, epoch, 7, 1, None, "")
    assert t.commit_positions(position=lambda tp: 9) == {P: 9}  # offset 8 was a commit marker
    t.add(rec(9))
    assert t.commit_positions(position=lambda tp: 10) == {P: 8}  # 9 is in hand: not past it


def test_an_offset_fetched_twice_keeps_its_first_entry_and_nothing_of_a_transaction_is_lost():
    """Found by review: re-adding an offset moved the cursors back past later SENT entries, which an abort then
    did not send again while their offsets committed."""
    t = OffsetTracker()
    epoch = t.open(P)
    for offset in (0, 1):
        t.add(rec(offset))
        ready(t, epoch, offset)
    assert [e.record.offset for e in t.release(0, one_round=False)] == [0, 1]
    t.add(rec(0))  # the client hands offset 0 over again
    assert len(t) == 2 and t.entry(P, epoch, 0).state is State.SENT
    t.transaction_aborted()
    assert [e.record.offset for e in t.release(0, one_round=False)] == [0, 1]
    t.transaction_committed()
    assert t.commit_positions(include_sent=True) == {P: 2}
