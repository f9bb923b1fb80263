"""The pipeline under stress: backpressure, outages, permanent errors, dying threads."""

import json
import sqlite3
import threading

import pytest
from sqlalchemy import text

from ingest.messages import Message
from support.httpclient import post_json, post_ndjson, request
from support.probes import count_rows, metric
from support.tcpproxy import TcpProxy
from support.waiting import wait_until


def test_backpressure_then_recovery(make_service, make_engine, sqlite_url) -> None:
    service = make_service(queue_size=10, consumers=1, batch_size=5, enqueue_timeout_s=0.2)
    engine = make_engine(sqlite_url)
    lock = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # a database that cannot be written: consumers stall
    accepted = 0
    for n in range(100):
        reply = post_json(service.url, {"n": n})
        if reply.status == 503:
            break
        assert reply.status == 202
        accepted += 1
    assert reply.status == 503, "the queue never filled"
    assert reply.headers["retry-after"] == "1"
    assert reply.json()["error"] == "queue is full (10 messages)"
    # The buffer holds 10 and the stalled consumer holds one batch of at most 5.
    assert 10 <= accepted <= 15
    assert metric(service, "ingest_messages_rejected_total", {"reason": "queue_full", "client": "anonymous"}) == 1
    wait_until(lambda: metric(service, "ingest_db_retries_total") >= 1, what="a retry")
    lock.execute("COMMIT")
    lock.close()
    wait_until(lambda: count_rows(engine) == accepted, what=f"{accepted} rows")
    assert post_json(service.url, {"after": True}).status == 202
    wait_until(lambda: count_rows(engine) == accepted + 1, what="the next message stored")


def test_a_request_is_enqueued_all_or_none(make_service, make_engine, sqlite_url) -> None:
    service = make_service(queue_size=10, consumers=1, batch_size=1, enqueue_timeout_s=0.2)
    engine = make_engine(sqlite_url)
    lock = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    assert post_ndjson(service.url, [{"first": i} for i in range(6)]).status == 202
    # The stalled consumer holds one message: five wait in the buffer, five places are free.
    wait_until(lambda: metric(service, "ingest_db_retries_total") >= 1, what="the consumer holding a batch")
    assert metric(service, "ingest_queue_depth") == 5
    reply = post_ndjson(service.url, [{"second": i} for i in range(6)])
    assert reply.status == 503 and reply.headers["retry-after"] == "1"
    assert metric(service, "ingest_queue_depth") == 5  # none of the six went in
    assert metric(service, "ingest_messages_rejected_total", {"reason": "queue_full", "client": "anonymous"}) == 6
    assert post_ndjson(service.url, [{"third": i} for i in range(5)]).status == 202
    lock.execute("ROLLBACK")
    lock.close()
    wait_until(lambda: count_rows(engine) == 11, what="the 11 accepted messages")
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT payload FROM messages")).scalars().all()
    assert not any("second" in json.loads(p) for p in stored)


def test_request_bigger_than_the_queue_is_413(make_service) -> None:
    service = make_service(queue_size=3)
    reply = post_ndjson(service.url, [{"n": n} for n in range(4)])
    assert reply.status == 413 and "more than the queue holds" in reply.json()["error"]
    assert metric(service, "ingest_messages_rejected_total", {"reason": "too_large", "client": "anonymous"}) == 4


def test_postgres_outage_retries_then_stores_everything(make_service, make_engine, postgres_url) -> None:
    host_port = postgres_url.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.split(":")
    proxy = TcpProxy(host, int(port))
    try:
        proxied = postgres_url.replace(host_port, f"127.0.0.1:{proxy.port}")
        service = make_service(db_url=proxied, consumers=2, batch_linger_s=0)
        engine = make_engine(postgres_url)
        assert post_json(service.url, {"before": True}, query="?ack=commit").status == 201
        proxy.cut()
        for n in range(20):
            assert post_ndjson(service.url, [{"n": n, "i": i} for i in range(5)]).status == 202
        committed: list[int] = []
        waiter = threading.Thread(
            target=lambda: committed.append(post_json(service.url, {"commit": 1}, query="?ack=commit").status)
        )
        waiter.start()
        wait_until(lambda: metric(service, "ingest_db_retries_total") >= 2, what="retries during the outage")
        assert request(f"{service.url}/readyz").status == 503
        assert count_rows(engine) == 1
        proxy.restore()
        waiter.join(60)
        assert committed == [201]
        wait_until(lambda: count_rows(engine) == 102, timeout_s=30, what="all 102 rows after the outage")
        wait_until(lambda: request(f"{service.url}/readyz").status == 200, what="ready again")
        assert metric(service, "ingest_messages_stored_total") == 102
    finally:
        proxy.close()


def test_refused_messages_are_dead_lettered_and_the_rest_stored(make_service, make_engine, postgres_url) -> None:
    service = make_service(db_url=postgres_url, consumers=1, batch_linger_s=0)
    engine = make_engine(postgres_url)
    batch = [{"n": n} for n in range(10)]
    batch[3]["bad"] = "nul \u0000 byte"  # valid JSON, but JSONB cannot store U+0000
    batch[7]["bad"] = "\u0000"
    reply = post_ndjson(service.url, batch, query="?ack=commit")
    assert reply.status == 500
    assert reply.json()["detail"] == {"stored": 8, "failed": 2, "request": reply.headers["x-request-id"]}
    assert "refused by the database" in reply.json()["error"]
    assert count_rows(engine) == 8
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT payload, error FROM dead_letters ORDER BY id")).all()
    assert [r.payload for r in rows] == ['{"n": 3, "bad": "nul \\u0000 byte"}', '{"n": 7, "bad": "\\u0000"}']
    assert [r.error for r in rows] == ["UntranslatableCharacter: unsupported Unicode escape sequence"] * 2
    assert metric(service, "ingest_messages_dead_lettered_total") == 2
    # The pipeline is not blocked: the next request goes straight through.
    assert post_json(service.url, {"after": True}, query="?ack=commit").status == 201


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_consumer_that_dies_is_counted_and_replaced_and_loses_nothing(
    make_service, make_engine, sqlite_url, monkeypatch, caplog
) -> None:
    service = make_service(consumers=1, batch_linger_s=0)
    engine = make_engine(sqlite_url)
    original = service.store.write
    first = service.supervisor.consumers()[0]
    calls = {"n": 0}

    def write_failing_once(batch: list[Message]):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected bug")
        return original(batch)

    monkeypatch.setattr(service.store, "write", write_failing_once)
    reply = post_ndjson(service.url, [{"n": n} for n in range(5)], query="?ack=commit")
    assert (reply.status, reply.counts()) == (201, {"stored": 5, "duplicates": 0})
    assert count_rows(engine) == 5
    assert metric(service, "ingest_thread_errors_total", {"thread": "consumer-1"}) == 1
    assert metric(service, "ingest_consumer_restarts_total") == 1
    replacement = service.supervisor.consumers()[0]
    assert replacement is not first and replacement.name == "consumer-1" and not first.is_alive()
    wait_until(lambda: metric(service, "ingest_consumers_alive") == 1, what="consumer alive again")
    assert "consumer-1 died holding 5 message(s)" in caplog.text
    assert "RuntimeError: injected bug" in caplog.text


def test_while_draining_new_requests_get_503_and_readyz_is_false(make_service, make_engine, sqlite_url) -> None:
    service = make_service(consumers=1, batch_linger_s=0)
    lock = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # the drain cannot finish until the lock goes
    assert post_json(service.url, {"held": 1}).status == 202
    wait_until(lambda: metric(service, "ingest_db_retries_total") >= 1, what="the held write retrying")
    service.shutdown.stopping.set()  # what SIGTERM does; the main loop starts the drain
    reply = request(f"{service.url}/readyz")
    assert (reply.status, reply.json()) == (503, {"ready": False, "reason": "stopping"})
    reply = post_json(service.url, {"late": 1})
    assert reply.status == 503 and reply.headers["retry-after"] == "1"
    assert reply.json()["error"] == "service is shutting down"
    assert metric(service, "ingest_messages_rejected_total", {"reason": "shutting_down", "client": "anonymous"}) == 1
    lock.execute("ROLLBACK")
    lock.close()
    wait_until(lambda: not service.listener.is_alive(), timeout_s=30, what="the drain to finish")
    assert count_rows(make_engine(sqlite_url)) == 1


def test_text_that_copy_must_escape_is_stored_exactly(make_service, make_engine, db_url) -> None:
    """Tabs, CRs and newlines as JSON whitespace, backslash escapes in strings: all stored."""
    service = make_service(db_url=db_url, consumers=1)
    body = b'{\n\t"tab": "a\\tb",\r\n "slash": "c:\\\\dir", "quote": "\\"q\\"", "nl": "x\\ny", "u": "\\u00e9"\n}'
    reply = request(f"{service.url}/messages?ack=commit", "POST", body, {"Content-Type": "application/json"})
    assert reply.status == 201, reply.body
    with make_engine(db_url).connect() as conn:
        stored = conn.execute(text("SELECT payload FROM messages")).scalar_one()
    expected = {"tab": "a\tb", "slash": "c:\\dir", "quote": '"q"', "nl": "x\ny", "u": "é"}
    assert (stored if isinstance(stored, dict) else json.loads(stored)) == expected
