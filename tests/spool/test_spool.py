"""The spool: a 202 means on disk, survives `kill -9`, and nothing is stored twice.

Real `ingest serve` processes killed with SIGKILL, real Postgres behind a TCP proxy the test cuts,
real spool files; in-process services where a crash must land at one exact place.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import text

from ingest.spool import file as spool
from ingest.spool.writer import SpoolWriter
from support.httpclient import request
from support.probes import count_rows, metric, metric_text
from support.serving import serving
from support.tcpproxy import TcpProxy
from support.waiting import wait_until


def _post(url: str, seqs: range, *, ack: str = "enqueue") -> int:
    body = "".join(json.dumps({"seq": s}) + "\n" for s in seqs)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", f"/messages?ack={ack}", body, {"Content-Type": "application/x-ndjson"})
        return conn.getresponse().status
    finally:
        conn.close()


def _pusher(url: str, acked: set[int], stop: threading.Event, first: int) -> None:
    """Send batches of 20 until the service goes away; remember every 202."""
    seq = first
    while not stop.is_set():
        try:
            status = _post(url, range(seq, seq + 20))
        except OSError:
            return  # killed
        if status == 202:
            acked.update(range(seq, seq + 20))
        seq += 20


def _stored_seqs(engine) -> tuple[set[int], int]:
    with engine.connect() as conn:
        seqs = [row[0] for row in conn.execute(text("SELECT (payload->>'seq')::bigint FROM messages"))]
    return set(seqs), len(seqs)


def _via(held: TcpProxy, url: str) -> str:
    parts = urlsplit(url)
    return url.replace(f"@{parts.hostname}:{parts.port}/", f"@127.0.0.1:{held.port}/", 1)


@pytest.mark.parametrize("sync", ["full", "normal"])
@pytest.mark.parametrize("database", ["cut", "up"])
def test_every_202_survives_kill_9_and_is_stored_exactly_once(
    make_engine, postgres_url, tmp_path, sync, database
) -> None:
    """Killed with the database cut (acknowledged requests wait in the spool, some partly
    written by a batch that failed) or up (requests partly stored, their rows not yet deleted)."""
    engine = make_engine(postgres_url)
    path = tmp_path / "spool.db"
    proxy = TcpProxy("127.0.0.1", urlsplit(postgres_url).port or 5432)
    args = ["--db", _via(proxy, postgres_url), "--spool", str(path), "--spool-sync", sync, "--queue-size", "500"]
    try:
        with serving(args) as first:
            stop = threading.Event()
            sets: list[set[int]] = [set() for _ in range(3)]
            threads = [threading.Thread(target=_pusher, args=(first.url, sets[i], stop, i * 10_000_000),
                                        name=f"push-{i}") for i in range(3)]
            for thread in threads:
                thread.start()
            wait_until(lambda: sum(map(len, sets)) >= 2_000, 60, "2,000 messages acknowledged")
            if database == "cut":
                proxy.cut()  # the database goes away: what arrives now waits in the spool
            before = sum(map(len, sets))
            wait_until(lambda: sum(map(len, sets)) >= before + 2_000, 60, "2,000 more acknowledged")
            first.process.send_signal(signal.SIGKILL)
            first.wait(30)
            stop.set()
            for thread in threads:
                thread.join(30)
        acked = set().union(*sets)
        in_spool = spool.status(spool.open_spool(path, create=False, writable=False)).messages
        if database == "cut":
            assert in_spool > 0, "the kill should have left acknowledged messages in the spool"
            proxy.restore()
        with serving(args) as second:
            assert f"recovered {in_spool} message(s)" in "".join(second.log)
            wait_until(lambda: acked <= _stored_seqs(engine)[0], 60, "every acknowledged message stored")
            wait_until(lambda: metric_text(second.url, "ingest_spool_messages") == 0, 30, "an empty spool")
    finally:
        proxy.close()
    seqs, rows = _stored_seqs(engine)
    assert acked <= seqs
    assert rows == len(seqs), f"{rows - len(seqs)} message(s) stored twice"


def test_a_crash_between_the_commit_and_the_spool_delete_stores_nothing_twice(
    make_service, make_engine, db_url, tmp_path, monkeypatch
) -> None:
    """The first service loses every deletion, as a crash right after the database commit
    would; the second recovers those rows, finds them stored, and stores none again."""
    path = str(tmp_path / "spool.db")
    monkeypatch.setattr(SpoolWriter, "forget", lambda self, batch: None)  # the crash, injected
    first = make_service(db_url=db_url, spool=path)
    assert first.spool is not None
    for n in range(5):
        assert _post(first.url, range(n * 10, n * 10 + 10), ack="commit") == 201
    first.shutdown.stopping.set()
    wait_until(lambda: first.spool is not None and not first.spool.writer.is_alive(), 30, "the first service stopped")
    assert spool.status(spool.open_spool(Path(path), create=False, writable=False)).messages == 50
    monkeypatch.undo()

    second = make_service(db_url=db_url, spool=path)
    assert second.spool is not None
    wait_until(lambda: metric(second, "ingest_messages_duplicate_total") == 50, 30, "50 duplicates found")
    wait_until(lambda: second.spool is not None and second.spool.messages == 0, 30, "an empty spool")
    assert count_rows(make_engine(db_url)) == 50
    assert metric(second, "ingest_messages_stored_total") == 0


def test_a_burst_ten_times_the_queue_is_absorbed_by_the_spool(make_service, make_engine, sqlite_url, tmp_path) -> None:
    service = make_service(queue_size=100, batch_size=50, enqueue_timeout_s=0.01, spool=str(tmp_path / "s.db"))
    statuses = [_post(service.url, range(n * 100, n * 100 + 100)) for n in range(10)]
    assert statuses == [202] * 10
    wait_until(lambda: count_rows(make_engine(sqlite_url)) == 1000, 30, "all 1,000 stored")
    assert metric(service, "ingest_messages_rejected_total", {"reason": "queue_full", "client": "anonymous"}) == 0


def test_a_full_spool_answers_503_with_retry_after(make_service, tmp_path) -> None:
    service = make_service(spool=str(tmp_path / "s.db"), spool_max_bytes=2_000)
    body = "".join(json.dumps({"seq": s, "pad": "x" * 50}) + "\n" for s in range(40)).encode()
    reply = request(f"{service.url}/messages", "POST", body, {"Content-Type": "application/x-ndjson"})
    assert reply.status == 503
    assert reply.headers["retry-after"] == "1"
    assert reply.json()["error"] == "spool is full (2000 bytes)"
    assert metric(service, "ingest_messages_rejected_total", {"reason": "spool_full", "client": "anonymous"}) == 40
    assert _post(service.url, range(3)) == 202  # a request that fits still goes in


def _spool_with_rows(path: Path, messages: int) -> None:
    """A spool holding `messages` messages (identities g:x:1 on, texts `{}`), in requests of 1 to
    7 messages, written as the spool writer writes them."""
    rows = []
    n = 1
    while n <= messages:
        count = min(1 + len(rows) % 7, messages - n + 1)
        packed = spool.pack(["{}"] * count, [f"g:x:{i}" for i in range(n, n + count)], "")
        rows.append((len(rows) + 1, 0.0, 0, None, None, None, count, packed.bytes, packed.idents, packed.ident_lengths,
                     packed.texts, packed.text_lengths))
        n += count
    conn = spool.open_spool(path)
    with conn:
        conn.execute("BEGIN")
        spool.insert(conn, rows)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _execute(path: Path, statement: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute(statement)
    conn.commit()
    conn.close()


def _foreign(path: Path) -> None:
    _execute(path, "CREATE TABLE notes (body TEXT)")


def _newer(path: Path) -> None:
    _spool_with_rows(path, 1)
    _execute(path, f"UPDATE meta SET value = '{spool.VERSION + 1}' WHERE key = 'version'")


def _truncated(path: Path) -> None:
    _spool_with_rows(path, 3000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: p.write_bytes(b"\x00garbage" * 512), "not a spool file (not SQLite"),
        (_foreign, "a SQLite file, but not an ingest spool (tables: notes)"),
        (_newer, f"format version {spool.VERSION + 1}, this ingest reads versions 1 to {spool.VERSION}"),
        (_truncated, "damaged"),
    ],
    ids=["garbage", "foreign", "newer", "truncated"],
)
def test_a_bad_spool_file_is_one_line_and_exit_1_and_left_untouched(tmp_path, make, says) -> None:
    path = tmp_path / "spool.db"
    make(path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    for args in (["serve", "--port", "0", "--db", f"sqlite:///{tmp_path / 'db.sqlite'}", "--spool", str(path)],
                 ["spool", "status", "--spool", str(path)]):
        done = subprocess.run([sys.executable, "-m", "ingest", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("ingest: error:")]
        assert len(errors) == 1 and f"spool {path}: " in errors[0] and says in errors[0], done.stderr
        assert "Traceback" not in done.stderr
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    wal = tmp_path / "spool.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0, "nothing may be written to a refused spool"


def test_spool_status_prints_depth_and_age_without_a_service(tmp_path) -> None:
    path = tmp_path / "spool.db"
    _spool_with_rows(path, 7)
    done = subprocess.run([sys.executable, "-m", "ingest", "spool", "status", "--spool", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(None, 1) for line in done.stdout.splitlines())
    assert lines["messages"] == "7" and lines["spool"] == str(path)
    assert float(lines["oldest"].removesuffix(" s")) > 1e9  # received_at 0 in this file: the epoch


def test_recovered_messages_feed_the_consumers_in_order(make_service, make_engine, sqlite_url, tmp_path) -> None:
    path = tmp_path / "spool.db"
    _spool_with_rows(path, 1200)
    make_service(spool=str(path), queue_size=100, consumers=1)
    wait_until(lambda: count_rows(make_engine(sqlite_url)) == 1200, 30, "the recovered rows stored")
    with make_engine(sqlite_url).connect() as conn:
        idents = list(conn.execute(text("SELECT ident FROM messages ORDER BY id")).scalars())
    assert idents == [f"g:x:{n}" for n in range(1, 1201)]


def test_a_spool_in_use_by_another_process_is_refused(make_service, tmp_path) -> None:
    path = tmp_path / "spool.db"
    make_service(spool=str(path))
    done = subprocess.run(
        [sys.executable, "-m", "ingest", "serve", "--port", "0", "--db", f"sqlite:///{tmp_path / 'other.db'}",
         "--spool", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert f"ingest: error: spool {path}: in use by another ingest process" in done.stderr
