"""Store.write on a real database at head, called on the test thread: no service, no threads.

The fast path, duplicates, a refused message isolated and dead-lettered, a locked database
retried, and the drain deadline (hard_stop) ending the retries.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from ingest.db.tables import requests
from ingest.errors import TransientStoreError
from ingest.messages import Message, Receipt
from support.stages import MOMENT, Stages, bodies, careful_path_taken, fresh, known, lock_sqlite, refuse_bad
from support.waiting import wait_until

MakeStages = Callable[..., Stages]


def test_new_identities_take_the_fast_path_in_one_transaction(make_stages: MakeStages, head_db_url: str) -> None:
    stages = make_stages(head_db_url)
    batch = fresh(bodies(5))
    result = stages.store.write(batch)
    assert result.stored == batch and result.duplicates == [] and result.dead == []
    assert stages.rows() == [(m.ident, json.loads(m.text)) for m in batch]
    assert not careful_path_taken(stages)
    assert stages.sample("ingest_db_write_seconds_count") == 1
    assert stages.sample("ingest_db_retries_total") == 0


def test_identities_written_twice_are_stored_once(make_stages: MakeStages, head_db_url: str) -> None:
    stages = make_stages(head_db_url)
    first = known(bodies(4))
    assert stages.store.write(first).stored == first
    # The same identities again (a retried request), with other payloads, beside two new ones.
    again = known(bodies(6, start=100))
    result = stages.store.write(again)
    assert result.duplicates == again[:4]
    assert result.stored == again[4:]
    assert result.dead == []
    assert stages.rows() == [(m.ident, json.loads(m.text)) for m in first + again[4:]]
    assert stages.sample("ingest_messages_dead_lettered_total") == 0


def test_a_fresh_batch_that_was_stored_already_is_sorted_out_not_refused(make_stages: MakeStages,
                                                                         head_db_url: str) -> None:
    """A batch handed back after its commit: the fast path fails on the unique index, and the
    careful path finds every message a duplicate; nothing is dead-lettered."""
    stages = make_stages(head_db_url)
    batch = fresh(bodies(3))
    stages.store.write(batch)
    result = stages.store.write(batch)
    assert result.stored == [] and result.dead == []
    assert result.duplicates == batch
    assert careful_path_taken(stages)
    assert len(stages.rows()) == 3 and stages.letters() == []
    assert stages.sample("ingest_db_retries_total") == 0


def test_of_two_messages_with_one_identity_in_a_batch_the_first_is_stored(make_stages: MakeStages,
                                                                         sqlite_url: str) -> None:
    stages = make_stages(sqlite_url)
    first, second = (Message(json.dumps({"copy": n}), MOMENT, ident="k:same:0") for n in (1, 2))
    result = stages.store.write([first, second])
    assert (result.stored, result.duplicates) == ([first], [second])
    assert stages.rows() == [("k:same:0", {"copy": 1})]


def test_a_refused_message_is_dead_lettered_and_the_rest_of_its_batch_stored(make_stages: MakeStages,
                                                                             head_db_url: str) -> None:
    stages = make_stages(head_db_url)
    refuse_bad(stages.engine)
    receipt = Receipt("req-1", 7, MOMENT)
    texts = bodies(7)
    texts[4] = json.dumps({"n": 4, "bad": True})
    batch = [Message(t, MOMENT, ident=f"k:req-1:{n}", receipt=receipt) for n, t in enumerate(texts)]
    result = stages.store.write(batch)

    refused = batch[4]
    assert [m for m, _ in result.dead] == [refused]
    assert result.stored == batch[:4] + batch[5:]
    error = result.dead[0][1]
    assert error.startswith("CheckViolation: " if stages.dialect == "postgresql" else "IntegrityError: bad refused")
    assert stages.letters() == [(refused.ident, refused.text, error)]
    assert [ident for ident, _ in stages.rows()] == [m.ident for m in result.stored]
    with stages.engine.connect() as conn:
        row = conn.execute(select(requests.c.stored, requests.c.dead_lettered).where(requests.c.id == "req-1")).one()
    assert tuple(row) == (6, 1)
    assert stages.sample("ingest_messages_dead_lettered_total") == 1
    assert stages.sample("ingest_db_retries_total") == 0  # refused is permanent: never retried


def test_a_request_written_again_is_neither_dead_lettered_nor_counted_twice(make_stages: MakeStages,
                                                                            head_db_url: str) -> None:
    """A stream's request delivered again after its writer died between the commit and the ack (or
    a spool's row fed again after a crash lost its deletion): the same request, message for message."""
    stages = make_stages(head_db_url)
    refuse_bad(stages.engine)
    texts = bodies(3)
    texts[1] = json.dumps({"n": 1, "bad": True})

    def delivery(request: str = "req-1") -> list[Message]:
        receipt = Receipt(request, 3, MOMENT)
        return [Message(t, MOMENT, ident=f"k:req-1:{n}", receipt=receipt) for n, t in enumerate(texts)]

    first = stages.store.write(delivery())
    again = stages.store.write(delivery())

    assert [m.ident for m, _ in first.dead] == [m.ident for m, _ in again.dead] == ["k:req-1:1"]
    assert [m.ident for m in again.duplicates] == ["k:req-1:0", "k:req-1:2"]
    assert [ident for ident, _, _ in stages.letters()] == ["k:req-1:1"]
    assert _receipt(stages, "req-1") == (2, 1)
    assert stages.sample("ingest_messages_dead_lettered_total") == 1
    # A client's retry under a request id of its own: its letter, which a replay moves into its receipt.
    stages.store.write(delivery("req-2"))
    assert [ident for ident, _, _ in stages.letters()] == ["k:req-1:1", "k:req-1:1"]
    assert _receipt(stages, "req-2") == (2, 1)


def test_a_request_written_again_after_its_first_writing_stored_only_part_counts_each_once(
        make_stages: MakeStages, head_db_url: str) -> None:
    """The first writing's writer died after storing the good messages and before the letter:
    the second writing finds them stored and letters the refused one; the receipt ends 2 and 1."""
    stages = make_stages(head_db_url)
    refuse_bad(stages.engine)
    texts = bodies(3)
    texts[1] = json.dumps({"n": 1, "bad": True})
    receipt = Receipt("req-1", 3, MOMENT)
    whole = [Message(t, MOMENT, ident=f"k:req-1:{n}", receipt=receipt) for n, t in enumerate(texts)]
    stages.store.write([whole[0], whole[2]])
    stages.store.write([Message(m.text, MOMENT, ident=m.ident, receipt=Receipt("req-1", 3, MOMENT)) for m in whole])
    assert [ident for ident, _, _ in stages.letters()] == ["k:req-1:1"]
    assert _receipt(stages, "req-1") == (2, 1)


def _receipt(stages: Stages, request: str) -> tuple[int, int]:
    with stages.engine.connect() as conn:
        row = conn.execute(select(requests.c.stored, requests.c.dead_lettered).where(requests.c.id == request)).one()
    return (row.stored, row.dead_lettered)


def test_text_jsonb_refuses_is_dead_lettered_as_received(make_stages: MakeStages, postgres_head_url: str) -> None:
    """On Postgres the payload is jsonb: the database, not the listener, finds this text invalid."""
    stages = make_stages(postgres_head_url)
    batch = fresh(['{"fine": 1}', '{"broken": ', '{"fine": 2}'])
    result = stages.store.write(batch)
    assert [m for m, _ in result.dead] == [batch[1]]
    assert result.stored == [batch[0], batch[2]]
    [(ident, payload, error)] = stages.letters()
    assert (ident, payload) == (batch[1].ident, '{"broken": ')
    assert error.startswith("InvalidTextRepresentation: ")
    assert stages.rows() == [(batch[0].ident, {"fine": 1}), (batch[2].ident, {"fine": 2})]


def test_a_locked_database_is_retried_until_the_lock_goes(make_stages: MakeStages, sqlite_url: str) -> None:
    stages = make_stages(sqlite_url, busy_timeout_s=0.01)
    batch = fresh(bodies(3))
    lock = lock_sqlite(sqlite_url)
    with ThreadPoolExecutor(1, thread_name_prefix="test-writer") as writer:
        try:
            written = writer.submit(stages.store.write, batch)
            wait_until(lambda: stages.sample("ingest_db_retries_total") >= 1, 10, "a retry")
            assert not written.done()
            assert (stages.store.database_error or "").startswith("OperationalError: database is locked")
            lock.rollback()  # from the test thread, while the writer is between retries
            result = written.result(10)
        finally:
            lock.close()  # also when an assertion failed: the writer must end
    assert result.stored == batch and result.dead == []
    assert stages.store.database_error is None
    assert [ident for ident, _ in stages.rows()] == [m.ident for m in batch]


def test_the_drain_deadline_ends_the_retries(make_stages: MakeStages, sqlite_url: str) -> None:
    stages = make_stages(sqlite_url, busy_timeout_s=0.01)
    lock = lock_sqlite(sqlite_url)
    with ThreadPoolExecutor(1, thread_name_prefix="test-writer") as writer:
        try:
            written = writer.submit(stages.store.write, fresh(bodies(3)))
            # Retrying for as long as it takes: only the Event ends it.
            wait_until(lambda: stages.sample("ingest_db_retries_total") >= 3, 10, "three retries")
            assert not written.done()
            stages.hard_stop.set()
            with pytest.raises(TransientStoreError, match=r"^drain deadline passed while retrying: OperationalError"):
                written.result(10)
        finally:
            stages.hard_stop.set()  # also when an assertion failed: the writer must end
            lock.close()
    assert stages.rows() == [] and stages.letters() == []
