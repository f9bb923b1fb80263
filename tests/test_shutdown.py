"""SIGTERM on a real `ingest serve` under load: exit 0, every acknowledged message stored."""

import http.client
import json
import signal
import threading
from urllib.parse import urlsplit

from sqlalchemy import text

from support.httpclient import post_json
from support.probes import count_rows
from support.serving import serving
from support.tcpproxy import TcpProxy
from support.waiting import wait_until


def _pusher(url: str, acked: set[int], stop: threading.Event, first: int) -> None:
    """Push batches of 50 until the service refuses; remember what was acknowledged (202)."""
    host, port = url.removeprefix("http://").split(":")
    seq = first
    while not stop.is_set():
        batch = list(range(seq, seq + 50))
        body = "".join(json.dumps({"seq": s, "pad": "x" * 64}) + "\n" for s in batch)
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("POST", "/messages", body, {"Content-Type": "application/x-ndjson"})
            status = conn.getresponse().status
            conn.close()
        except OSError:
            return  # the listener has closed: the service is gone
        if status == 202:
            acked.update(batch)
        elif status == 503:
            return  # shutting down: stop accepting is what we asked for
        else:
            raise AssertionError(f"unexpected status {status}")
        seq += 50


def test_sigterm_under_load_drains_and_exits_zero(make_engine, postgres_url) -> None:
    engine = make_engine(postgres_url)
    with serving(["--db", postgres_url, "--consumers", "4", "--batch-linger", "0.005"]) as proc:
        stop = threading.Event()
        sets: list[set[int]] = [set() for _ in range(4)]
        threads = [
            threading.Thread(target=_pusher, args=(proc.url, sets[i], stop, i * 10_000_000), name=f"push-{i}")
            for i in range(4)
        ]
        for thread in threads:
            thread.start()
        wait_until(lambda: sum(map(len, sets)) >= 5000, timeout_s=60, what="5000 acknowledged under load")
        proc.process.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        stop.set()
        for thread in threads:
            thread.join(60)
    log = "".join(proc.log)
    assert code == 0, log
    assert "ingest stopped (exit code 0)" in log
    acked = set().union(*sets)
    with engine.connect() as conn:
        stored = {row[0] for row in conn.execute(text("SELECT (payload->>'seq')::bigint FROM messages"))}
    assert acked <= stored, f"{len(acked - stored)} acknowledged messages missing"
    assert count_rows(engine) == len(stored)  # and nothing stored twice


def test_second_signal_or_deadline_exit_code_is_reported(make_engine, sqlite_url, tmp_path) -> None:
    """A drain that cannot finish (database locked) ends at the deadline with exit code 3."""
    import sqlite3

    path = sqlite_url.removeprefix("sqlite:///")
    with serving(["--db", sqlite_url, "--consumers", "1", "--drain-timeout", "1"]) as proc:
        host, port = proc.url.removeprefix("http://").split(":")
        lock = sqlite3.connect(path, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/messages", json.dumps({"a": 1}), {"Content-Type": "application/json"})
        assert conn.getresponse().status == 202
        conn.close()
        wait_until(lambda: "retrying" in "".join(proc.log), what="a retry in the log")
        proc.process.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        lock.execute("ROLLBACK")
        lock.close()
    log = "".join(proc.log)
    assert code == 3, log
    assert "1 message(s) not stored at the drain deadline" in log


def test_a_write_blocked_in_the_database_is_interrupted_at_the_deadline(make_engine, postgres_url) -> None:
    """A table lock makes COPY wait forever; the drain deadline must still end the process."""
    import psycopg

    from ingest.config import Settings
    from ingest.service import EXIT_DRAIN_TIMEOUT, Service

    service = Service(Settings.from_mapping(
        {"port": 0, "db_url": postgres_url, "consumers": 1, "drain_timeout_s": 1.0, "batch_linger_s": 0}
    ))
    service.start()
    plain = postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(plain) as locker:
        locker.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        assert post_json(service.url, {"stuck": 1}).status == 202
        wait_until(lambda: service.pool.in_use == 1, what="the consumer blocked inside COPY")
        assert service.stop() == EXIT_DRAIN_TIMEOUT
        assert not any(c.is_alive() for c in service.supervisor.consumers())
        assert service.metrics.registry.get_sample_value("ingest_messages_lost_total") == 1
        locker.rollback()


def _catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for `signum` (the SigCgt mask in /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def test_sigterm_during_start_up_is_kept_and_drains_once_started(postgres_url) -> None:
    """A `docker stop` right after start must not be lost: handlers come before the slow start.

    The database is reached through a proxy that holds every connection until released, so the
    start-up is stuck connecting while the signal arrives.
    """
    dsn = urlsplit(postgres_url)
    held = TcpProxy(dsn.hostname or "127.0.0.1", dsn.port or 5432, held=True)
    via_proxy = postgres_url.replace(f"@{dsn.hostname}:{dsn.port}/", f"@127.0.0.1:{held.port}/", 1)
    try:
        with serving(["--db", via_proxy, "--consumers", "1"], wait_ready=False) as proc:
            pid = proc.process.pid
            wait_until(lambda: _catches(pid, signal.SIGTERM), 20, "the SIGTERM handler, while start-up waits")
            assert not any("ingest ready" in line for line in proc.log)
            proc.process.send_signal(signal.SIGTERM)
            held.release()
            code = proc.wait(60)
    finally:
        held.close()
    log = "".join(proc.log)
    assert code == 0, log
    assert "ingest ready" in log and "ingest stopped (exit code 0)" in log
