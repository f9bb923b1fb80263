"""Receipts: every 2xx names its request, and GET /requests/{id} says what became of it.

Real services over real HTTP, on SQLite and Postgres: through a stalled database, a dead letter,
a restart with a spool, a crash after the commit, and two replicas on one database.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from ingest.cli import run
from ingest.spool import file as spool
from ingest.spool.writer import SpoolWriter
from support.httpclient import Reply, post_ndjson, request
from support.probes import metric
from support.stages import refuse_bad
from support.tcpproxy import TcpProxy
from support.waiting import wait_until

OPENAPI = Path(__file__).resolve().parents[1] / "service" / "ingest" / "http" / "openapi.json"


def _push(url: str, count: int, *, query: str = "", headers: dict[str, str] | None = None, tag: str = "") -> Reply:
    body = "".join(json.dumps({"n": n, "tag": tag}) + "\n" for n in range(count)).encode()
    return request(f"{url}/messages{query}", "POST", body, {"Content-Type": "application/x-ndjson", **(headers or {})})


def _via(proxy: TcpProxy, postgres_url: str) -> str:
    parts = urlsplit(postgres_url)
    return postgres_url.replace(f"@{parts.hostname}:{parts.port}/", f"@127.0.0.1:{proxy.port}/", 1)


def _receipt(url: str, request_id: str, headers: dict[str, str] | None = None) -> Reply:
    return request(f"{url}/requests/{request_id}", headers=headers)


def _counts(url: str, request_id: str) -> dict[str, Any]:
    reply = _receipt(url, request_id)
    assert reply.status == 200, reply.body
    body = dict(reply.json())
    assert body.pop("request") == request_id
    return body


def _settled(url: str, request_id: str, **wanted: int) -> bool:
    body = _counts(url, request_id)
    return all(body[key] == value for key, value in wanted.items())


def test_every_2xx_names_its_request_in_the_body_and_a_header(make_service) -> None:
    service = make_service()
    made = [_push(service.url, 3) for _ in range(2)]
    ids = [reply.json()["request"] for reply in made]
    assert all(reply.status == 202 and reply.headers["x-request-id"] == reply.json()["request"] for reply in made)
    assert len(set(ids)) == 2, "each request gets an id of its own"
    committed = _push(service.url, 2, query="?ack=commit")
    assert committed.status == 201 and committed.counts() == {"stored": 2, "duplicates": 0}


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("order-7f3a:2026-11-27.1", True), ("0b9d6a8e-4c1f-4a57-9a1e-3f3c2b1d0e9f", True),
     ("has space", False), ("a/b", False), ("x" * 129, False), ("", False)],
)
def test_a_client_request_id_is_kept_when_sane_and_replaced_otherwise(make_service, sent, kept) -> None:
    service = make_service()
    reply = _push(service.url, 1, headers={"X-Request-Id": sent})
    assert reply.status == 202
    assert (reply.json()["request"] == sent) is kept
    assert reply.headers["x-request-id"] == reply.json()["request"]


def test_a_receipt_counts_what_is_stored(make_service, db_url) -> None:
    service = make_service(db_url=db_url)
    request_id = _push(service.url, 25, headers={"X-Request-Id": "batch-25"}).json()["request"]
    wait_until(lambda: _settled(service.url, request_id, stored=25), 20, "all 25 stored")
    assert _counts(service.url, request_id) == {"accepted": 25, "stored": 25, "dead_lettered": 0, "pending": 0}


def test_an_unknown_or_malformed_id_is_404(make_service) -> None:
    service = make_service()
    for request_id in ("never-sent", "bad%20id"):
        reply = _receipt(service.url, request_id)
        assert reply.status == 404, reply.body
        assert reply.json()["error"].startswith("no such request")


def test_a_receipt_needs_the_same_token_as_a_push(make_service, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("client:client-token-0123456789\n")
    service = make_service(auth_tokens=str(tokens))
    auth = {"Authorization": "Bearer client-token-0123456789"}
    request_id = _push(service.url, 1, headers=auth).json()["request"]
    assert _receipt(service.url, request_id).status == 401
    wait_until(lambda: _receipt(service.url, request_id, auth).json().get("stored") == 1, 20, "stored")


def test_through_a_stall_the_accepting_replica_says_pending_then_stored(make_service, sqlite_url) -> None:
    """The database takes nothing while a lock is held: the receipt comes from this process's
    ledger (pending), then from the database once the lock goes."""
    service = make_service(batch_linger_s=0)
    lock = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        request_id = _push(service.url, 7).json()["request"]
        assert _counts(service.url, request_id) == {"accepted": 7, "stored": 0, "dead_lettered": 0, "pending": 7}
        assert metric(service, "ingest_requests_in_flight") == 1
        lock.execute("ROLLBACK")
    finally:
        lock.close()
    wait_until(lambda: _settled(service.url, request_id, stored=7, pending=0), 30, "stored after the stall")
    wait_until(lambda: metric(service, "ingest_requests_in_flight") == 0, 10, "the ledger emptied")


def test_with_the_database_unreachable_the_ledger_answers_and_other_ids_get_503(
    make_service, postgres_url
) -> None:
    parts = urlsplit(postgres_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    try:
        service = make_service(db_url=_via(proxy, postgres_url))
        before = _push(service.url, 2).json()["request"]
        wait_until(lambda: _settled(service.url, before, stored=2), 20, "the first request stored")
        proxy.cut()
        during = _push(service.url, 4).json()["request"]
        assert _counts(service.url, during) == {"accepted": 4, "stored": 0, "dead_lettered": 0, "pending": 4}
        gone = _receipt(service.url, before)  # committed, so no longer in flight here
        assert gone.status == 503 and int(gone.headers["retry-after"]) >= 1, gone.body
        proxy.restore()
        wait_until(lambda: _settled(service.url, during, stored=4), 60, "stored once the database is back")
    finally:
        proxy.close()


def test_a_dead_letter_shows_in_the_receipt(make_service, postgres_url) -> None:
    service = make_service(db_url=postgres_url, consumers=1, batch_linger_s=0)
    batch: list[dict[str, Any]] = [{"n": n} for n in range(10)]
    batch[3]["bad"] = "\u0000"  # valid JSON, but JSONB cannot store U+0000
    request_id = post_ndjson(service.url, batch).json()["request"]
    wait_until(lambda: _settled(service.url, request_id, pending=0), 20, "every message accounted for")
    assert _counts(service.url, request_id) == {"accepted": 10, "stored": 9, "dead_lettered": 1, "pending": 0}


def test_a_retry_with_the_same_key_is_stored_under_the_first_and_counted_by_both(make_service, db_url) -> None:
    service = make_service(db_url=db_url)
    key = {"Idempotency-Key": "receipt-retry"}
    first = _push(service.url, 5, query="?ack=commit", headers=key).json()["request"]
    again = _push(service.url, 5, query="?ack=commit", headers=key)
    assert again.counts() == {"stored": 0, "duplicates": 5}
    for request_id in (first, again.json()["request"]):
        assert _counts(service.url, request_id) == {"accepted": 5, "stored": 5, "dead_lettered": 0, "pending": 0}


def test_two_replicas_on_one_database_answer_for_each_other(make_service, postgres_url) -> None:
    one = make_service(db_url=postgres_url)
    two = make_service(db_url=postgres_url)
    request_id = _push(one.url, 30, query="?ack=commit").json()["request"]
    assert _counts(two.url, request_id) == {"accepted": 30, "stored": 30, "dead_lettered": 0, "pending": 0}
    assert _receipt(two.url, "nobody-sent-this").status == 404


def _spooled_at_stop(service: Any, sqlite_url: str, push: Callable[[], Any]) -> str:
    """Push with the database locked, then stop the service: its drain cannot finish, so the
    request's rows stay in the spool for the next service. Returns the request's id."""
    lock = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        request_id = str(push().json()["request"])
        service.shutdown.stopping.set()
        wait_until(lambda: service.spool is not None and not service.spool.writer.is_alive(), 30,
                   "the first service stopped")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    return request_id


def test_a_receipt_survives_a_restart_with_the_spool(make_service, sqlite_url, tmp_path) -> None:
    """Accepted into the spool while the database is locked; the service stops at its drain
    deadline with the rows still spooled; the next one stores them and the receipt says so."""
    path = str(tmp_path / "spool.db")
    first = make_service(spool=path, drain_timeout_s=1.0, batch_linger_s=0)
    request_id = _spooled_at_stop(
        first, sqlite_url, lambda: _push(first.url, 12, headers={"X-Request-Id": "across-a-restart"})
    )
    assert spool.status(spool.open_spool(Path(path), create=False, writable=False)).messages == 12
    second = make_service(spool=path)
    wait_until(lambda: _receipt(second.url, request_id).status == 200, 30, "the recovered request stored")
    wait_until(lambda: _settled(second.url, request_id, stored=12), 30, "all of it stored")
    assert _counts(second.url, request_id) == {"accepted": 12, "stored": 12, "dead_lettered": 0, "pending": 0}


def test_a_batch_written_again_after_a_crash_is_not_counted_twice(make_service, db_url, tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "spool.db")
    monkeypatch.setattr(SpoolWriter, "forget", lambda self, batch: None)  # the crash after the commit
    first = make_service(db_url=db_url, spool=path)
    ids = [_push(first.url, 10, query="?ack=commit").json()["request"] for _ in range(3)]
    first.shutdown.stopping.set()
    wait_until(lambda: first.spool is not None and not first.spool.writer.is_alive(), 30, "the first service stopped")
    monkeypatch.undo()
    second = make_service(db_url=db_url, spool=path)
    wait_until(lambda: second.spool is not None and second.spool.messages == 0, 30, "the spool written again")
    for request_id in ids:
        assert _counts(second.url, request_id) == {"accepted": 10, "stored": 10, "dead_lettered": 0, "pending": 0}


def test_a_version_1_spool_is_upgraded_and_its_rows_stored(make_service, tmp_path) -> None:
    path = tmp_path / "spool.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("CREATE TABLE spool (seq INTEGER PRIMARY KEY, ident TEXT NOT NULL, known INTEGER NOT NULL, "
                 "received_at REAL NOT NULL, payload TEXT NOT NULL)")
    conn.executemany("INSERT INTO meta VALUES (?, ?)", [("format", "ingest-spool"), ("version", "1")])
    conn.executemany("INSERT INTO spool VALUES (?, ?, 0, 0, '{}')", [(n, f"g:old:{n}") for n in range(1, 6)])
    conn.close()
    service = make_service(spool=str(path))
    wait_until(lambda: service.spool is not None and service.spool.messages == 0, 30, "the old rows stored")
    assert spool.status(spool.open_spool(path, create=False, writable=False)).messages == 0


def test_every_status_documented_for_receipts_is_produced(make_service, postgres_url, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("client:client-token-0123456789\n")
    parts = urlsplit(postgres_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    try:
        service = make_service(db_url=_via(proxy, postgres_url), auth_tokens=str(tokens))
        auth = {"Authorization": "Bearer client-token-0123456789"}
        request_id = _push(service.url, 1, query="?ack=commit", headers=auth).json()["request"]
        seen = {_receipt(service.url, request_id, auth).status, _receipt(service.url, request_id).status,
                _receipt(service.url, "unknown", auth).status}
        proxy.cut()
        seen.add(_receipt(service.url, request_id, auth).status)
    finally:
        proxy.close()
    documented = {int(code) for code in json.loads(OPENAPI.read_text())["paths"]["/requests/{id}"]["get"]["responses"]}
    assert seen == documented


def test_a_dead_letter_replayed_moves_the_receipt_and_the_waiting_gauge(
    make_service, make_engine, postgres_url, capsys, monkeypatch
) -> None:
    """Refused by a constraint, replayed once the constraint is gone: the receipt goes from
    dead-lettered to stored, and the gauge of letters waiting from 1 to 0."""
    from sqlalchemy import text

    from ingest import chores as chores_module
    from ingest.cli import run

    def replay_all() -> int:
        try:
            return run(["dead-letters", "replay", "--all", "--db", postgres_url])  # the database, not the service
        except SystemExit as exc:
            return int(exc.code or 0)

    monkeypatch.setattr(chores_module, "DEAD_LETTER_COUNT_INTERVAL_S", 0.2)
    service = make_service(db_url=postgres_url, consumers=1)
    engine = make_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE messages ADD CONSTRAINT not_three CHECK ((payload->>'n')::int <> 3)"))
    request_id = _push(service.url, 6).json()["request"]
    wait_until(lambda: _settled(service.url, request_id, pending=0), 20, "every message accounted for")
    assert _counts(service.url, request_id) == {"accepted": 6, "stored": 5, "dead_lettered": 1, "pending": 0}
    wait_until(lambda: metric(service, "ingest_dead_letters_waiting") == 1, 20, "one dead letter waiting")

    assert replay_all() == 1  # the cause is still there
    assert "refused again 1" in capsys.readouterr().out
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE messages DROP CONSTRAINT not_three"))
    assert replay_all() == 0
    assert "stored 1" in capsys.readouterr().out
    assert replay_all() == 0  # nothing left: stores nothing
    assert "replayed 0" in capsys.readouterr().out
    assert _counts(service.url, request_id) == {"accepted": 6, "stored": 6, "dead_lettered": 0, "pending": 0}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM messages")).scalar_one() == 6
    wait_until(lambda: metric(service, "ingest_dead_letters_waiting") == 0, 20, "no dead letter waiting")


def _cli(*args: str) -> int:
    from ingest.cli import run

    try:
        return run(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)


def test_requests_purge_deletes_old_receipts_and_asks_first(make_service, db_url, capsys, monkeypatch) -> None:
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # nobody at a terminal to answer
    service = make_service(db_url=db_url)
    ids = [_push(service.url, 2, query="?ack=commit").json()["request"] for _ in range(3)]
    capsys.readouterr()
    assert _cli("requests", "purge", "--db", db_url, "--before", "1h") == 0  # none that old
    assert "purged 0 receipt(s) of requests received before" in capsys.readouterr().out
    assert _cli("requests", "purge", "--db", db_url, "--before", "2999-01-01") == 1  # no terminal: no
    assert "purge declined: nothing deleted" in capsys.readouterr().err
    assert all(_receipt(service.url, request_id).status == 200 for request_id in ids)
    assert _cli("requests", "purge", "--db", db_url, "--before", "2999-01-01", "--yes") == 0
    assert "purged 3 receipt(s) of requests received before 2999-01-01T00:00:00Z" in capsys.readouterr().out
    assert all(_receipt(service.url, request_id).status == 404 for request_id in ids)
    assert _cli("requests", "purge", "--db", db_url, "--before", "yesterday") == 2
    assert "is not a time" in capsys.readouterr().err


def test_receipt_rows_keep_every_id_count_and_moment(db_url, make_engine) -> None:
    """receipt_rows writes Postgres' arrays as literals of its own: ids that need quoting or
    escaping, and each moment to the microsecond, must come back as they went in."""
    from datetime import UTC, datetime

    from sqlalchemy import select

    from ingest.db import migrate, receipt_rows
    from ingest.db.tables import requests
    from ingest.messages import Message, Receipt

    engine = make_engine(db_url)
    migrate.upgrade(engine)
    ids = ["plain-1", 'q"uote', "back\\slash", "NULL", "comma,{brace}", " spaced ", '","']
    moments = [1764243000.123456 + i * 1.000001 for i in range(len(ids))]
    receipts = [Receipt(rid, i + 2, moment) for i, (rid, moment) in enumerate(zip(ids, moments, strict=True))]
    batch = [Message("{}", r.received_at, ident=None, receipt=r) for r in receipts for _ in range(r.accepted - 1)]
    with engine.begin() as conn:
        receipt_rows.write(conn, batch)
        receipt_rows.write(conn, batch[:1], dead=True)
    with engine.connect() as conn:
        rows = {row.id: row for row in conn.execute(select(requests))}
    assert sorted(rows) == sorted(ids)
    for i, receipt in enumerate(receipts):
        row = rows[receipt.id]
        assert (row.accepted, row.stored, row.dead_lettered) == (i + 2, i + 1, 1 if i == 0 else 0)
        stored_at = row.received_at if row.received_at.tzinfo else row.received_at.replace(tzinfo=UTC)
        assert stored_at == datetime.fromtimestamp(receipt.received_at, UTC)


def test_whole_fresh_requests_skip_the_upsert_and_one_there_already_takes_the_careful_way(db_url, make_engine) -> None:
    """On the store's fast path, Postgres gets the receipts of whole requests whose ids this
    process made by COPY (receipt_rows.py); the others go through the upsert. Should such a row
    be there already (the same batch written twice, as after an uncertain commit), the batch
    takes the careful way: nothing dead-lettered, every receipt counted."""
    import threading

    from sqlalchemy import event, select

    from ingest.db import migrate
    from ingest.db.pool import ConnectionPool
    from ingest.db.store import Store
    from ingest.db.tables import dead_letters, requests
    from ingest.messages import Message
    from ingest.metrics import Metrics
    from ingest.receipts import Ledger

    engine = make_engine(db_url)
    migrate.upgrade(engine)
    ledger, moment = Ledger(), 1764243000.5
    fresh = [ledger.open(None, 1, moment) for _ in range(3)]
    split = ledger.open(None, 3, moment)  # two of its three messages in this batch
    client = ledger.open("client-made-1", 1, moment)
    assert [r.fresh for r in (*fresh, split, client)] == [True, True, True, True, False]
    batch = [Message("{}", moment, ident=None, known=False, receipt=r) for r in (*fresh, split, split, client)]
    upserted: list[set[str]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.startswith("INSERT INTO requests"):
            if isinstance(parameters, tuple):  # Postgres: the ids as one array literal
                upserted.append(set(parameters[0].strip("{}").replace('"', "").split(",")))
            else:  # SQLite: one row a tuple
                upserted.append({row[0] for row in parameters})

    pool = ConnectionPool(db_url, size=1)
    event.listen(pool.engine, "before_cursor_execute", seen)
    try:
        store = Store(pool, Metrics(["consumer-1"]), threading.Event())
        first = store.write(batch)
        second = store.write(batch)
    finally:
        pool.dispose()
    everyone = {r.id for r in (*fresh, split, client)}
    postgres = db_url.startswith("postgresql")
    assert upserted[0] == ({split.id, client.id} if postgres else everyone)
    assert upserted[-1] == everyone  # the second time, the careful way (or SQLite's only way)
    assert len(first.stored) == len(second.stored) == 6 and not first.dead and not second.dead
    with engine.connect() as conn:
        rows = {row.id: (row.accepted, row.stored) for row in conn.execute(select(requests))}
        assert conn.execute(select(dead_letters)).first() is None
    # Written twice, counted once: the upsert never counts past what was accepted.
    assert rows == {**{r.id: (1, 1) for r in fresh}, split.id: (3, 3), client.id: (1, 1)}


# ---------------------------------------------------------------- receipts per client (tokens)

ALICE = {"Authorization": "Bearer alice-token-0123456789"}
BOB = {"Authorization": "Bearer bob-token-0123456789xx"}


def _two_clients(tmp_path: Path) -> str:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:alice-token-0123456789\nbob:bob-token-0123456789xx\n")
    return str(tokens)


def test_with_tokens_a_receipt_is_its_clients_alone(make_service, db_url, tmp_path) -> None:
    """Ids made here (Postgres: the COPY path) and ids the client sent (the upsert) alike; in the
    ledger while pending, then in the database."""
    service = make_service(db_url=db_url, auth_tokens=_two_clients(tmp_path))
    made = _push(service.url, 4, query="?ack=commit", headers=ALICE).json()["request"]
    sent = _push(service.url, 3, query="?ack=commit", headers={**ALICE, "X-Request-Id": "alice-order-1"})
    assert sent.status == 201
    for request_id, accepted in ((made, 4), ("alice-order-1", 3)):
        mine = _receipt(service.url, request_id, ALICE)
        assert mine.status == 200 and mine.json()["stored"] == accepted, mine.body
        theirs = _receipt(service.url, request_id, BOB)
        assert theirs.status == 404 and theirs.json() == _receipt(service.url, "never-sent", BOB).json() | {
            "detail": {"request": request_id}
        }
    # Bob reusing Alice's id stores his messages, but neither reads nor changes her receipt.
    assert _push(service.url, 2, query="?ack=commit", headers={**BOB, "X-Request-Id": "alice-order-1"}).status == 201
    assert _receipt(service.url, "alice-order-1", BOB).status == 404
    assert _receipt(service.url, "alice-order-1", ALICE).json()["accepted"] == 3


def test_with_tokens_a_pending_receipt_is_its_clients_alone(make_service, sqlite_url, tmp_path) -> None:
    service = make_service(auth_tokens=_two_clients(tmp_path), batch_linger_s=0)
    lock = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # nothing commits: only the ledger knows the request
        request_id = _push(service.url, 2, headers=ALICE).json()["request"]
        assert _receipt(service.url, request_id, ALICE).json()["pending"] == 2
        assert _receipt(service.url, request_id, BOB).status == 404
    finally:
        lock.execute("ROLLBACK")
        lock.close()


def test_without_tokens_receipts_have_no_client_and_anyone_reads_them(make_service, sqlite_url) -> None:
    service = make_service()
    request_id = _push(service.url, 2, query="?ack=commit").json()["request"]
    assert _counts(service.url, request_id)["stored"] == 2
    conn = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    try:
        assert conn.execute("SELECT client FROM requests WHERE id = ?", (request_id,)).fetchall() == [(None,)]
    finally:
        conn.close()


def test_with_tokens_a_receipt_keeps_its_client_across_a_restart_with_the_spool(
    make_service, sqlite_url, tmp_path
) -> None:
    path = str(tmp_path / "spool.db")
    tokens = _two_clients(tmp_path)
    first = make_service(spool=path, drain_timeout_s=1.0, batch_linger_s=0, auth_tokens=tokens)
    request_id = _spooled_at_stop(first, sqlite_url, lambda: _push(first.url, 5, headers=ALICE))
    second = make_service(spool=path, auth_tokens=tokens)
    wait_until(lambda: _receipt(second.url, request_id, ALICE).status == 200, 30, "the recovered request stored")
    assert _receipt(second.url, request_id, BOB).status == 404


def test_dead_letters_list_names_the_client(make_service, postgres_head_url, make_engine, tmp_path, capsys) -> None:
    refuse_bad(make_engine(postgres_head_url))
    service = make_service(db_url=postgres_head_url, consumers=1, batch_linger_s=0, auth_tokens=_two_clients(tmp_path))
    reply = request(f"{service.url}/messages?ack=commit", "POST", b'{"bad": 1}\n{"ok": 1}\n',
                    {"Content-Type": "application/x-ndjson", **BOB})
    assert reply.status == 500, reply.body
    capsys.readouterr()
    assert run(["dead-letters", "list", "--db", postgres_head_url, "--json"]) in (0, None)
    (letter,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert letter["client"] == "bob" and letter["request"] == reply.json()["detail"]["request"]
