"""ConsumerThread.step() driven on the test thread (the thread is never started): one batch taken,
written, accounted in metrics and settled on the requests' records (messages.Receipt) their clients await."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from ingest.db.store import WriteResult
from ingest.messages import Message, WriteFailed
from support.stages import Stages, bodies, fresh, known, lock_sqlite, refuse_bad, waiting

MakeStages = Callable[..., Stages]


def test_an_empty_buffer_is_a_false_step_that_writes_nothing(make_stages: MakeStages, sqlite_url: str) -> None:
    stages = make_stages(sqlite_url)
    consumer = stages.consumer()
    assert consumer.step() is False
    stages.buffer.close()
    assert consumer.step() is False  # closed and empty: the run loop's cue to end
    assert stages.sample("ingest_batch_size_count") == 0
    assert stages.sample("ingest_db_write_seconds_count") == 0
    assert stages.rows() == []


def test_a_step_writes_one_batch_and_settles_its_acks(make_stages: MakeStages, head_db_url: str) -> None:
    stages = make_stages(head_db_url)
    settled: list[tuple[list[Message], WriteResult]] = []
    consumer = stages.consumer(after_commit=lambda batch, result: settled.append((batch, result)))
    ack = waiting(3)
    committed = fresh(bodies(3), prefix="g:a:", ack=ack)
    enqueued = fresh(bodies(2, start=3), prefix="g:b:")  # ack=enqueue: nobody waits
    assert stages.buffer.try_put_all(committed)
    assert stages.buffer.try_put_all(enqueued)

    assert consumer.step() is True
    assert ack.future.result(0) == (3, 0)
    assert [json.loads(m.text) for m in committed + enqueued] == [payload for _, payload in stages.rows()]
    assert stages.buffer.depth() == 0
    [(batch, result)] = settled
    assert batch == committed + enqueued and result.stored == batch
    assert stages.sample("ingest_messages_stored_total") == 5
    assert stages.sample("ingest_batch_size_count") == 1 and stages.sample("ingest_batch_size_sum") == 5
    assert stages.sample("ingest_message_latency_seconds_count") == 5
    assert consumer.step() is False


def test_a_step_takes_at_most_the_batch_size_in_order(make_stages: MakeStages, sqlite_url: str) -> None:
    stages = make_stages(sqlite_url)
    consumer = stages.consumer(batch_size=2)
    messages = fresh(bodies(5))
    stages.buffer.try_put_all(messages)
    assert consumer.step() is True
    assert stages.buffer.depth() == 3
    assert [ident for ident, _ in stages.rows()] == [m.ident for m in messages[:2]]
    assert [consumer.step() for _ in range(3)] == [True, True, False]
    assert [ident for ident, _ in stages.rows()] == [m.ident for m in messages]
    assert stages.sample("ingest_batch_size_count") == 3 and stages.sample("ingest_batch_size_sum") == 5


def test_duplicates_settle_the_ack_as_duplicates_not_stored(make_stages: MakeStages, head_db_url: str) -> None:
    stages = make_stages(head_db_url)
    consumer = stages.consumer()
    stages.buffer.try_put_all(known(bodies(2)))
    consumer.step()
    retry = waiting(3)  # the same request sent again, with one message more
    stages.buffer.try_put_all(known(bodies(3), ack=retry))
    assert consumer.step() is True
    assert retry.future.result(0) == (1, 2)
    assert len(stages.rows()) == 3
    assert stages.sample("ingest_messages_stored_total") == 3
    assert stages.sample("ingest_messages_duplicate_total") == 2


def test_a_refused_message_fails_its_request_and_the_others_are_stored(make_stages: MakeStages,
                                                                       sqlite_url: str) -> None:
    stages = make_stages(sqlite_url)
    refuse_bad(stages.engine)
    consumer = stages.consumer()
    refused_request, fine_request = waiting(2), waiting(1)
    stages.buffer.try_put_all(known(['{"n": 1}', '{"bad": 1}'], prefix="k:r1:", ack=refused_request))
    stages.buffer.try_put_all(known(['{"n": 2}'], prefix="k:r2:", ack=fine_request))
    assert consumer.step() is True

    failure = refused_request.future.exception(0)
    assert isinstance(failure, WriteFailed)
    assert (failure.stored, failure.failed) == (1, 1)
    assert str(failure).startswith("refused by the database: IntegrityError: bad refused")
    assert fine_request.future.result(0) == (1, 0)
    assert [ident for ident, _, _ in stages.letters()] == ["k:r1:1"]
    assert stages.sample("ingest_messages_dead_lettered_total") == 1
    assert stages.sample("ingest_messages_stored_total") == 2


@pytest.mark.timeout(10)  # should the Event not end the retries, step() would retry for ever
def test_at_the_drain_deadline_a_step_fails_the_batch_and_counts_it_lost(make_stages: MakeStages,
                                                                         sqlite_url: str) -> None:
    """The database is locked and the deadline has passed: one attempt, then the batch's clients
    hear it was not stored; it is not handed back (nothing would write it)."""
    stages = make_stages(sqlite_url, busy_timeout_s=0.01)
    consumer = stages.consumer()
    ack = waiting(2)
    stages.buffer.try_put_all(fresh(bodies(2), ack=ack))
    spooled = Message('{"spooled": true}', 0.0, ident="g:s:0", seq=7)  # kept in the spool file: not lost
    stages.buffer.try_put_all([spooled])
    stages.hard_stop.set()
    lock = lock_sqlite(sqlite_url)
    try:
        assert consumer.step() is True
    finally:
        lock.close()
    failure = ack.future.exception(0)
    assert isinstance(failure, WriteFailed) and failure.failed == 2
    assert str(failure).startswith("drain deadline passed while retrying: OperationalError: database is locked")
    assert stages.sample("ingest_messages_lost_total") == 2
    assert stages.sample("ingest_db_retries_total") == 1
    assert stages.buffer.depth() == 0 and stages.rows() == []


def test_an_unexpected_error_hands_the_batch_back_and_escalates(make_stages: MakeStages, sqlite_url: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a database error: the store does not judge it, the consumer hands its batch back at the
    head of the buffer and dies loudly (the supervisor's part is tested elsewhere)."""
    stages = make_stages(sqlite_url)
    consumer = stages.consumer(batch_size=2)
    ack = waiting(3)
    messages = fresh(bodies(3), ack=ack)
    stages.buffer.try_put_all(messages)

    def broken(batch: list[Message]) -> WriteResult:
        raise RuntimeError("a bug")

    monkeypatch.setattr(stages.store, "write", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        consumer.step()
    assert not ack.future.done()  # not settled: the batch is still to be written
    assert stages.buffer.take(10, 0.0, 0.0) == messages  # handed back, in order, ahead of the rest
