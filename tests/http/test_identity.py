"""Message identity: a retried request, a re-sent batch or a repeated event id is stored once.

Real services over real HTTP, on SQLite and on Postgres; no mocks of the database.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from ingest.db import migrate
from ingest.errors import Invalid
from ingest.http.identity import Generator, checked_key, from_field, from_key
from ingest.messages import Message
from support.httpclient import request
from support.probes import count_rows, metric


def _post(url: str, values: list[dict[str, object]], *, key: str | None = None, ack: str = "commit"):
    body = b"".join(json.dumps(v).encode() + b"\n" for v in values)
    headers = {"Content-Type": "application/x-ndjson"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return request(f"{url}/messages?ack={ack}", "POST", body, headers)


# ---------------------------------------------------------------- the identities themselves


def test_generated_identities_are_unique_and_grow_in_order() -> None:
    one, two = Generator(), Generator()
    first, second = one.take(3), one.take(2)
    assert len(set(first + second + two.take(5))) == 10
    assert first + second == sorted(first + second), "a fixed-width counter appends to the index"


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "tab\there", "naïve", "new\nline"])
def test_a_malformed_idempotency_key_is_refused(key: str) -> None:
    with pytest.raises(Invalid, match="Idempotency-Key must be 1 to 255 visible ASCII"):
        checked_key(key)


def test_a_key_names_each_message_by_its_place_in_the_request() -> None:
    assert checked_key("x" * 255) == "x" * 255
    assert from_key("order-7", 3) == ["k:order-7:0", "k:order-7:1", "k:order-7:2"]


@pytest.mark.parametrize("bad", ['{"id": ""}', '{"id": true}', '{"id": null}', '{"id": [1]}', '{"other": 1}'])
def test_an_id_field_must_be_a_non_empty_string_or_an_integer(bad: str) -> None:
    assert from_field(['{"id": "a"}', '{"id": 7}'], "id") == ["f:a", "f:7"]
    with pytest.raises(Invalid, match="message at index 1 has no usable 'id'"):
        from_field(['{"id": "a"}', bad], "id")


# ---------------------------------------------------------------- over HTTP


def test_a_retried_request_with_the_same_key_is_stored_once(make_service, make_engine, db_url) -> None:
    service = make_service(db_url=db_url)
    values = [{"n": n} for n in range(4)]
    first = _post(service.url, values, key="req-1")
    assert (first.status, first.counts()) == (201, {"stored": 4, "duplicates": 0})
    again = _post(service.url, values, key="req-1")
    assert (again.status, again.counts()) == (201, {"stored": 0, "duplicates": 4})
    other = _post(service.url, values, key="req-2")  # another key is another request
    assert other.counts() == {"stored": 4, "duplicates": 0}
    assert count_rows(make_engine(db_url)) == 8
    assert metric(service, "ingest_messages_duplicate_total") == 4


def test_a_retry_with_ack_enqueue_is_accepted_and_still_stored_once(make_service, make_engine, db_url) -> None:
    service = make_service(db_url=db_url)
    for _ in range(3):
        reply = _post(service.url, [{"n": 1}, {"n": 2}], key="fire-and-forget", ack="enqueue")
        assert (reply.status, reply.counts()) == (202, {"accepted": 2})
    assert _post(service.url, [{"n": 3}], key="last").status == 201  # flushes what came before
    assert count_rows(make_engine(db_url)) == 3


def test_a_malformed_key_is_a_400_with_a_json_body(make_service) -> None:
    service = make_service()
    reply = _post(service.url, [{"n": 1}], key="two words")
    assert reply.status == 400
    assert "Idempotency-Key" in reply.json()["error"]


def test_the_same_key_is_stored_once_across_a_restart(make_service, make_engine, db_url) -> None:
    first = make_service(db_url=db_url)
    assert _post(first.url, [{"n": 1}, {"n": 2}], key="across").counts() == {"stored": 2, "duplicates": 0}
    first.shutdown.stopping.set()
    second = make_service(db_url=db_url)
    assert _post(second.url, [{"n": 1}, {"n": 2}], key="across").counts() == {"stored": 0, "duplicates": 2}
    assert count_rows(make_engine(db_url)) == 2


def test_two_replicas_on_one_database_store_a_retried_request_once(make_service, make_engine, postgres_url) -> None:
    one, two = make_service(db_url=postgres_url), make_service(db_url=postgres_url)
    values = [{"n": n} for n in range(50)]
    assert _post(one.url, values, key="lb-retry").counts() == {"stored": 50, "duplicates": 0}
    assert _post(two.url, values, key="lb-retry").counts() == {"stored": 0, "duplicates": 50}
    assert count_rows(make_engine(postgres_url)) == 50


def test_an_id_field_stores_each_event_once(make_service, make_engine, db_url) -> None:
    service = make_service(db_url=db_url, id_field="event_id")
    first = _post(service.url, [{"event_id": "a", "v": 1}, {"event_id": 2, "v": 2}])
    assert first.counts() == {"stored": 2, "duplicates": 0}
    # a repeated id within one request counts once too
    mixed = _post(service.url, [{"event_id": "a"}, {"event_id": "c"}, {"event_id": "c"}])
    assert mixed.counts() == {"stored": 1, "duplicates": 2}
    missing = _post(service.url, [{"event_id": "d"}, {"v": 3}])
    assert missing.status == 400
    assert missing.json()["detail"] == {"index": 1, "field": "event_id"}
    engine = make_engine(db_url)
    with engine.connect() as conn:
        idents = sorted(conn.execute(text("SELECT ident FROM messages")).scalars())
    assert idents == ["f:2", "f:a", "f:c"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_batch_written_twice_is_stored_once(make_service, make_engine, db_url, monkeypatch, tmp_path) -> None:
    """The store commits, then fails before it returns: the consumer cannot know, hands the batch
    back, and the replacement writes it again. With a spool, generated identities are kept, take
    the fast path, which the unique index refuses; the batch then goes through the
    duplicate-skipping path: the duplicate path run for real."""
    service = make_service(db_url=db_url, consumers=1, batch_linger_s=0, spool=str(tmp_path / "s.db"))
    original = service.store.write
    calls = {"n": 0}

    def die_after_commit(batch: list[Message]):
        result = original(batch)
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected: died between the commit and the acknowledgement")
        return result

    monkeypatch.setattr(service.store, "write", die_after_commit)
    reply = _post(service.url, [{"n": n} for n in range(5)])
    assert (reply.status, reply.counts()) == (201, {"stored": 0, "duplicates": 5})
    assert count_rows(make_engine(db_url)) == 5
    assert metric(service, "ingest_messages_duplicate_total") == 5
    assert metric(service, "ingest_consumer_restarts_total") == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_consumer_that_dies_after_its_commit_does_not_write_again(make_service, make_engine, db_url, monkeypatch):
    """Without a spool, generated identities are not kept: the consumer itself must never hand
    back a batch it has committed."""

    service = make_service(db_url=db_url, consumers=1, batch_linger_s=0)
    original = service.ledger.committed
    calls = {"n": 0}

    def fail_once(stored: list[Message], duplicates: list[Message], dead: list[tuple[Message, str]]) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected: a bug after the commit")
        original(stored, duplicates, dead)

    monkeypatch.setattr(service.ledger, "committed", fail_once)
    reply = _post(service.url, [{"n": n} for n in range(5)])
    assert reply.status == 500 and "stored, but the service failed after the commit" in reply.json()["error"]
    assert _post(service.url, [{"n": 9}]).status == 201  # the replacement works
    assert count_rows(make_engine(db_url)) == 6
    assert metric(service, "ingest_consumer_restarts_total") == 1


# ---------------------------------------------------------------- the migration


def test_upgrading_a_database_with_rows_keeps_them_and_dedupes_new_writes(make_engine, empty_db_url) -> None:
    engine = make_engine(empty_db_url)
    migrate.upgrade(engine, "0001")
    with engine.begin() as conn:
        for n in range(3):
            conn.execute(
                text("INSERT INTO messages (received_at, payload) VALUES (CURRENT_TIMESTAMP, :p)"),
                {"p": json.dumps({"old": n})},
            )
    migrate.upgrade(engine)
    assert migrate.current(engine) == "0005"
    with engine.begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM messages WHERE ident IS NULL")).scalar_one() == 3
        insert = text("INSERT INTO messages (received_at, payload, ident) VALUES (CURRENT_TIMESTAMP, '{}', :i)")
        conn.execute(insert, {"i": "k:x:0"})
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(insert, {"i": "k:x:0"})
    assert count_rows(engine) == 4
