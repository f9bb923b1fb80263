"""A database that hangs instead of failing: a proxy that holds every byte, never closing.

What `docker pause postgres`, a hung server or a network that drops packets does: no refusal, no
reset, nothing ever answers. Readiness must say so within seconds, a write held in it must end and
be retried, and the drain deadline must bound the shutdown whatever the database does.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from support.httpclient import post_json, request
from support.probes import count_rows
from support.serving import serving
from support.tcpproxy import TcpProxy
from support.waiting import wait_until

DRAIN_S = 2.0
EXIT_SLACK_S = 6.0  # "within the deadline plus a few seconds"


@pytest.fixture
def link(postgres_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """A proxy to the test's Postgres database and the URL that goes through it."""
    dsn = urlsplit(postgres_url)
    proxy = TcpProxy(dsn.hostname or "127.0.0.1", dsn.port or 5432)
    via = postgres_url.replace(f"@{dsn.hostname}:{dsn.port}/", f"@127.0.0.1:{proxy.port}/", 1)
    yield proxy, via
    proxy.close()


def _commit(url: str, replies: list[int]) -> None:
    """A client that waits for its commit (ack=commit), for as long as the service makes it."""
    body = json.dumps({"c": 1}).encode()
    reply = request(f"{url}/messages?ack=commit", "POST", body, {"Content-Type": "application/json"}, timeout_s=60)
    replies.append(reply.status)


def _readyz(url: str) -> tuple[int, dict[str, object]]:
    reply = request(f"{url}/readyz")
    return reply.status, reply.json()


def test_readyz_turns_503_within_seconds_of_the_link_freezing_and_back_after(make_service, link) -> None:
    proxy, via = link
    service = make_service(db_url=via, consumers=1)
    assert _readyz(service.url) == (200, {"ready": True})
    proxy.freeze()
    frozen_at = time.monotonic()
    wait_until(lambda: _readyz(service.url)[0] == 503, timeout_s=15, what="/readyz to say 503")
    took = time.monotonic() - frozen_at
    status, body = _readyz(service.url)
    assert status == 503 and body["ready"] is False
    assert "database" in str(body["reason"]), body
    assert took < 10, f"/readyz still said 200 {took:.1f}s after the link froze"
    # The main loop kept supervising meanwhile: a consumer that dies is still replaced.
    assert service.supervisor.alive() == 1
    proxy.thaw()
    wait_until(lambda: _readyz(service.url)[0] == 200, timeout_s=30, what="/readyz to say 200 again")


def test_a_write_held_by_a_frozen_link_is_cut_retried_and_stored_once(make_service, make_engine, link) -> None:
    proxy, via = link
    service = make_service(db_url=via, consumers=1, statement_timeout_s=1.0, batch_linger_s=0.0)
    proxy.freeze()
    assert post_json(service.url, {"held": 1}).status == 202
    registry = service.metrics.registry
    wait_until(lambda: (registry.get_sample_value("ingest_db_calls_cut_total") or 0) >= 1, timeout_s=20,
               what="the held write to be cut at its statement timeout")
    assert service.supervisor.alive() == 1  # released, not dead: it retries
    proxy.thaw()
    engine = make_engine(service.settings.db_url)
    wait_until(lambda: count_rows(engine) == 1, timeout_s=30, what="the message stored after the thaw")
    assert (registry.get_sample_value("ingest_db_retries_total") or 0) >= 1
    assert registry.get_sample_value("ingest_messages_stored_total") == 1
    assert count_rows(engine) == 1


def test_ack_commit_through_a_frozen_link_gets_its_201_after_the_thaw(make_service, make_engine, link) -> None:
    proxy, via = link
    service = make_service(db_url=via, consumers=1, statement_timeout_s=1.0, batch_linger_s=0.0)
    proxy.freeze()
    replies: list[int] = []
    client = threading.Thread(target=_commit, args=(service.url, replies), name="commit-client")
    client.start()
    registry = service.metrics.registry
    wait_until(lambda: (registry.get_sample_value("ingest_db_calls_cut_total") or 0) >= 1, timeout_s=20,
               what="the held write to be cut")
    proxy.thaw()
    client.join(60)
    assert replies == [201]
    assert count_rows(make_engine(service.settings.db_url)) == 1


def _frozen_sigterm(
    via: str, proxy: TcpProxy, extra: list[str], *, commit_client: bool
) -> tuple[int, float, str, list[int]]:
    """Start serve through the link, accept a message, freeze, SIGTERM.

    Returns the exit code, the seconds from SIGTERM to exit, the log and the commit client's answers."""
    replies: list[int] = []
    args = ["--db", via, "--consumers", "1", "--drain-timeout", str(DRAIN_S), "--batch-linger", "0", *extra]
    with serving(args) as proc:
        proxy.freeze()
        assert post_json(proc.url, {"frozen": 1}).status == 202
        if commit_client:
            threading.Thread(target=_commit, args=(proc.url, replies), name="commit-client", daemon=True).start()
        wait_until(lambda: "ingest_db_pool_in_use 1.0" in request(f"{proc.url}/metrics").body.decode(), timeout_s=15,
                   what="the consumer held in the frozen database")
        began = time.monotonic()
        proc.process.send_signal(signal.SIGTERM)
        code = proc.wait(DRAIN_S + 30)
        took = time.monotonic() - began
        wait_until(lambda: len(replies) == int(commit_client), timeout_s=10, what="the commit client's answer")
    return code, took, "".join(proc.log), replies


def test_sigterm_with_a_frozen_database_exits_3_within_the_deadline(link) -> None:
    proxy, via = link
    code, took, log, replies = _frozen_sigterm(via, proxy, [], commit_client=True)
    assert code == 3, log
    assert took < DRAIN_S + EXIT_SLACK_S, f"exit took {took:.1f}s with --drain-timeout {DRAIN_S}:\n{log}"
    assert "not stored" in log and "drain deadline" in log, log
    assert "ingest stopped (exit code 3)" in log, log
    assert replies and 500 <= replies[0] < 600, replies  # told, not left hanging


def test_sigterm_with_a_frozen_database_and_a_spool_exits_0_and_stores_after_a_thaw(
    link, make_engine, tmp_path: Path
) -> None:
    proxy, via = link
    spool = str(tmp_path / "spool.db")
    code, took, log, _ = _frozen_sigterm(via, proxy, ["--spool", spool], commit_client=False)
    assert code == 0, log
    assert took < DRAIN_S + EXIT_SLACK_S, f"exit took {took:.1f}s with --drain-timeout {DRAIN_S}:\n{log}"
    assert "stay in the spool" in log, log
    proxy.thaw()
    engine = make_engine(via)
    with serving(["--db", via, "--consumers", "1", "--spool", spool]) as proc:
        wait_until(lambda: count_rows(engine) == 1, timeout_s=30, what="the spooled message stored after restart")
        with engine.connect() as conn:
            assert [row[0] for row in conn.exec_driver_sql("SELECT payload FROM messages")] == [{"frozen": 1}]
        proc.process.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_a_consumer_stuck_connecting_at_the_deadline_is_left_behind_and_the_process_still_exits(link) -> None:
    """The held write is cut (statement timeout 1 s) and its retry connects through the frozen
    link: connect() is not a call the pool can cut, so at the deadline the consumer is still held.
    The stop leaves it behind (its message counted lost) and the process exits all the same."""
    proxy, via = link
    args = ["--db", via, "--consumers", "1", "--drain-timeout", "1", "--batch-linger", "0",
            "--statement-timeout", "1"]
    with serving(args) as proc:
        proxy.freeze()
        assert post_json(proc.url, {"frozen": 1}).status == 202
        wait_until(lambda: "cut their connection" in "".join(proc.log), timeout_s=20,
                   what="the held write cut, its retry now connecting")
        began = time.monotonic()
        proc.process.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        took = time.monotonic() - began
    log = "".join(proc.log)
    assert code == 3, log
    assert took < 1 + EXIT_SLACK_S, f"exit took {took:.1f}s with --drain-timeout 1:\n{log}"
    assert "consumer-1 is still held by the database" in log and "leaving it behind with 1 message(s)" in log, log
    assert "1 accepted message(s) were not stored: the drain deadline passed while the database held" in log, log
    [exit_line] = [line for line in log.splitlines() if "still blocked in the database:" in line]
    assert "consumer-1" in exit_line.split("database:", 1)[1], log
