"""A spool directory: a file per process, adopted by another once its process is gone.

Real `ingest serve` processes (single and `--workers`) killed with SIGKILL while Postgres is away
behind a TCP proxy the test cuts; in-process writers and adopters where two must race for one file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import text

# The pushing and counting helpers of the spool's own tests (same directory, on sys.path).
from test_spool import _post, _pusher, _stored_seqs, _via

from ingest.messages import Message, Receipt
from ingest.spool import directory
from ingest.spool import file as spool
from ingest.spool.adopter import SpoolAdopter
from ingest.spool.writer import SpoolWriter
from support.httpclient import request
from support.probes import count_rows, metric, metric_text
from support.serving import serving
from support.tcpproxy import TcpProxy
from support.waiting import wait_until


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _orphan(path: Path, seqs: range, request: str) -> None:
    """A spool file as a process that is gone left it: `seqs` acknowledged, none stored."""
    writer = SpoolWriter(path, sync="normal", max_bytes=1 << 30)
    writer.open()
    writer.start()
    try:
        now = time.time()
        receipt = Receipt(request, len(seqs), now)
        batch = [Message(json.dumps({"seq": s}), now, ident=f"g:test:{s}", known=False, receipt=receipt)
                 for s in seqs]
        writer.submit(batch).result(30)
    finally:
        writer.close()
        writer.join()
        writer.release()


def _messages_in(path: Path) -> int:
    conn = spool.open_spool(path, create=False, writable=False)
    try:
        return spool.status(conn).messages
    finally:
        conn.close()


def _files(folder: Path) -> list[Path]:
    return directory.spool_files(folder)


def test_each_process_keeps_its_own_file_and_deletes_it_when_it_stops_empty(make_service, tmp_path) -> None:
    folder = tmp_path / "spool"
    first = make_service(spool=f"{folder}/")
    second = make_service(spool=f"{folder}/")
    assert first.spool.writer.path != second.spool.writer.path
    assert set(_files(folder)) == {first.spool.writer.path, second.spool.writer.path}
    assert all(directory.owned(path) for path in _files(folder))
    assert _post(first.url, range(50), ack="commit") == 201
    first.stop()
    assert _files(folder) == [second.spool.writer.path]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        second.spool.writer.path.name + suffix for suffix in ("", "-shm", "-wal", ".lock")
    ), "the stopped process's db, -wal, -shm and lock files are all gone"


def test_an_orphan_absorbed_twice_is_stored_once_and_its_receipts_count_once(
    make_service, make_engine, sqlite_url, tmp_path
) -> None:
    """An adopter that dies between its commit and the orphan's delete leaves the orphan's rows in
    two files; whoever adopts both stores each message once, and its receipt says so."""
    folder = tmp_path / "spool"
    folder.mkdir()
    lost, adopter_file = folder / "spool-lost.db", folder / "spool-dead-adopter.db"
    _orphan(lost, range(100), "request-lost")
    _orphan(adopter_file, range(100, 150), "request-adopter")
    writer = SpoolWriter(adopter_file, sync="normal", max_bytes=1 << 30)
    writer.open()
    writer.start()
    conn = spool.open_spool(lost, create=False, writable=False)
    writer.absorb(lost, spool.status(conn)).result(30)  # ... and the "crash": `lost` is not deleted
    conn.close()
    writer.close()
    writer.join()
    writer.release()
    assert (_messages_in(lost), _messages_in(adopter_file)) == (100, 150)

    service = make_service(db_url=sqlite_url, spool=f"{folder}/")
    engine = make_engine(sqlite_url)
    wait_until(lambda: count_rows(engine) == 150 and service.spool.messages == 0, 30, "150 stored, the spool empty")
    wait_until(lambda: _files(folder) == [service.spool.writer.path], 10, "both orphans deleted")
    assert metric(service, "ingest_messages_duplicate_total") == 100
    assert metric(service, "ingest_spool_orphaned_messages") == 0
    with engine.connect() as db:
        seqs = [json.loads(p)["seq"] for p in db.execute(text("SELECT payload FROM messages")).scalars()]
    assert sorted(seqs) == list(range(150))
    # The requests row counts the copy found stored too (as after any crash between a commit and
    # the spool's delete); the receipt a client reads never says more than the request sent.
    for request_id, accepted in (("request-lost", 100), ("request-adopter", 50)):
        receipt = request(f"{service.url}/requests/{request_id}").json()
        assert (receipt["accepted"], receipt["stored"], receipt["pending"]) == (accepted, accepted, 0), receipt


def _race(adopter: SpoolAdopter, start: threading.Barrier) -> None:
    start.wait(10)
    adopter.scan()


def test_two_adopters_racing_for_one_file_one_adopts_it_the_other_skips(tmp_path) -> None:
    """flock is per open file, so two adopters in one process race as two processes would."""
    folder = tmp_path / "spool"
    folder.mkdir()
    writers = [SpoolWriter(directory.own_file(folder), sync="normal", max_bytes=1 << 30) for _ in range(2)]
    for writer in writers:
        writer.open()
        writer.start()
    adopters = [SpoolAdopter(writer, folder) for writer in writers]
    try:
        for round_ in range(10):
            _orphan(folder / f"spool-orphan-{round_}.db", range(round_ * 200, round_ * 200 + 200), f"r{round_}")
            before = [w.messages for w in writers]
            start = threading.Barrier(2)
            racers = [threading.Thread(target=_race, args=(a, start), name=f"racer-{i}")
                      for i, a in enumerate(adopters)]
            for racer in racers:
                racer.start()
            for racer in racers:
                racer.join(30)
            gained = sorted(w.messages - b for w, b in zip(writers, before, strict=True))
            assert gained == [0, 200], f"round {round_}: {gained}"
            assert sorted(_files(folder)) == sorted(w.path for w in writers), f"round {round_}: the orphan stays"
        assert sum(_messages_in(w.path) for w in writers) == 2000
    finally:
        for writer in writers:
            writer.close()
            writer.join()
            writer.release()
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".lock") == sorted(
        w.path.name + ".lock" for w in writers), "no lock file left of an adopted orphan"


def test_spool_status_lists_every_file_of_a_directory_and_its_owner(make_service, tmp_path) -> None:
    folder = tmp_path / "spool"
    folder.mkdir()
    _orphan(folder / "spool-gone.db", range(7), "r")
    owner = SpoolWriter(folder / "spool-alive.db", sync="normal", max_bytes=1 << 30)
    owner.open()  # holds its lock, as a live process does
    try:
        done = subprocess.run([sys.executable, "-m", "ingest", "spool", "status", "--spool", str(folder)],
                              capture_output=True, text=True, timeout=60)
    finally:
        owner.release()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "spool-alive.db  owned by a live process  messages 0  bytes 0" in lines
    assert any(line.startswith("spool-gone.db  orphaned (no process holds its lock)  messages 7 ") for line in lines)
    assert "orphaned 7" in lines and "files    2" in lines


def test_spool_status_leaves_out_a_file_gone_since_the_listing_and_shows_a_starting_one_empty(tmp_path) -> None:
    """Seen under Docker: an adopter removed a file between the listing and its reading, and the
    status called it unreadable ("no such file") and exited 1."""
    removed, starting = tmp_path / "spool-adopted.db", tmp_path / "spool-starting.db"
    lock = spool.claim(starting)  # a process that took its lock ...
    try:
        starting.touch()  # ... and whose file SQLite has not yet written
        assert directory._entry(removed) is None
        entry = directory._entry(starting)
        assert entry is not None and entry.owned and entry.status == directory.EMPTY
        assert entry.format() == "spool-starting.db  owned by a live process  messages 0  bytes 0"
    finally:
        lock.close()
    starting.write_bytes(b"not a spool, long enough to be read as one" * 4)
    broken = directory._entry(starting)
    assert broken is not None and broken.status is None and broken.error, "a damaged file stays an error"


@pytest.fixture
def read_only_view(tmp_path: Path):  # type: ignore[no-untyped-def]
    """tmp_path/ro: a read-only bind mount of tmp_path/rw (tests run as root; root ignores modes)."""
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(rw), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        yield rw, ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_spool_status_reads_a_healthy_spool_on_a_read_only_mount(read_only_view) -> None:
    rw, ro = read_only_view
    _orphan(rw / "spool-a.db", range(3), "r")
    for args in (["--spool", str(ro / "spool-a.db")], ["--spool", str(ro)]):
        done = subprocess.run([sys.executable, "-m", "ingest", "spool", "status", *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "damaged" not in done.stdout + done.stderr
        assert "messages 3" in done.stdout


def _acked(sets: list[set[int]]) -> int:
    return sum(map(len, sets))


def test_three_processes_on_one_directory_two_killed_the_survivor_stores_every_202_once(
    make_engine, postgres_url, tmp_path
) -> None:
    engine = make_engine(postgres_url)
    folder = tmp_path / "spool"
    proxy = TcpProxy("127.0.0.1", urlsplit(postgres_url).port or 5432)
    args = ["--db", _via(proxy, postgres_url), "--spool", f"{folder}/", "--queue-size", "500"]
    stop = threading.Event()
    try:
        with serving(args) as a, serving(args) as b, serving(args) as survivor:
            sets: list[set[int]] = [set() for _ in range(3)]
            pushers = [threading.Thread(target=_pusher, args=(p.url, sets[i], stop, i * 10_000_000), name=f"push-{i}")
                       for i, p in enumerate((a, b, survivor))]
            for pusher in pushers:
                pusher.start()
            wait_until(lambda: all(len(s) >= 500 for s in sets), 60, "each process acknowledged 500")
            proxy.cut()  # Postgres goes away: what is acknowledged now waits in the spools
            before = [len(s) for s in sets]
            wait_until(lambda: all(len(s) >= n + 1_000 for s, n in zip(sets, before, strict=True)), 60,
                       "1,000 more each, spooled")
            for killed in (a, b):
                killed.process.send_signal(signal.SIGKILL)
                killed.wait(30)
            wait_until(lambda: not pushers[0].is_alive() and not pushers[1].is_alive(), 30, "their pushers ended")
            left = sum(_messages_in(p) for p in _files(folder) if not directory.owned(p))
            assert left > 0 or any("adopted" in line for line in survivor.log), "the kills left nothing to adopt"
            wait_until(lambda: _files(folder) == [p for p in _files(folder) if directory.owned(p)]
                       and len(_files(folder)) == 1, 30, "both orphans adopted while Postgres is still away")
            assert sum("(its process is gone)" in line for line in survivor.log) == 2, "".join(survivor.log)
            stop.set()
            pushers[2].join(30)
            acked = set().union(*sets)
            proxy.restore()
            wait_until(lambda: acked <= _stored_seqs(engine)[0], 90, "every acknowledged message stored")
            wait_until(lambda: metric_text(survivor.url, "ingest_spool_messages") == 0, 30, "an empty spool")
            assert metric_text(survivor.url, "ingest_spool_orphaned_messages") == 0
    finally:
        stop.set()
        proxy.close()
    seqs, rows = _stored_seqs(engine)
    assert acked <= seqs
    assert rows == len(seqs), f"{rows - len(seqs)} message(s) stored twice"


def test_a_spool_directory_from_three_workers_is_stored_by_two(make_engine, postgres_url, tmp_path) -> None:
    engine = make_engine(postgres_url)
    folder = tmp_path / "spool"
    proxy = TcpProxy("127.0.0.1", urlsplit(postgres_url).port or 5432)
    port = _free_port()

    def workers(n: int) -> list[str]:
        return ["--workers", str(n), "--port", str(port), "--db", _via(proxy, postgres_url),
                "--spool", f"{folder}/", "--drain-timeout", "1"]

    url = f"http://127.0.0.1:{port}"
    try:
        with serving(workers(3), wait_ready=False) as three:
            wait_until(lambda: any("(3 workers," in line for line in three.log), 60, "three workers ready")
            proxy.cut()  # nothing reaches the database: a 202 now means in a worker's spool file
            acked: list[int] = []
            for n in range(60):
                if _post(url, range(n * 50, n * 50 + 50)) == 202:
                    acked.extend(range(n * 50, n * 50 + 50))
            three.process.send_signal(signal.SIGTERM)
            assert three.wait(60) == 0
        left = [line for line in three.log if "acknowledged messages left in spool" in line]
        assert len(left) == 3, "".join(three.log)
        assert len(_files(folder)) == 3 and not any(directory.owned(p) for p in _files(folder))
        assert sum(_messages_in(p) for p in _files(folder)) == len(acked) == 3000
        proxy.restore()
        with serving(workers(2), wait_ready=False) as two:
            wait_until(lambda: any("(2 workers," in line for line in two.log), 60, "two workers ready")
            wait_until(lambda: set(acked) <= _stored_seqs(engine)[0], 60, "every acknowledged message stored")
            wait_until(lambda: len(_files(folder)) == 2, 30, "the three files adopted")
            two.process.send_signal(signal.SIGTERM)
            assert two.wait(60) == 0
        assert _files(folder) == [], "two workers that stopped empty leave no file behind"
    finally:
        proxy.close()
    seqs, rows = _stored_seqs(engine)
    assert set(acked) <= seqs and rows == len(seqs) == 3000


def test_an_orphan_that_cannot_be_adopted_is_counted_logged_once_and_left_as_it_was(
    make_service, tmp_path, caplog
) -> None:
    folder = tmp_path / "spool"
    folder.mkdir()
    damaged = folder / "spool-damaged.db"
    _orphan(damaged, range(3000), "r")
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    before = damaged.read_bytes()
    service = make_service(spool=f"{folder}/")
    wait_until(lambda: metric(service, "ingest_spool_orphaned_messages") == 1, 10, "the damaged orphan counted")
    assert service.spool.adopter is not None
    adopter = service.spool.adopter
    opened = adopter.opened
    adopter.scan()  # a second round: counted again, not logged again, not opened again (unchanged)
    said = [r.getMessage() for r in caplog.records if "it cannot be adopted" in r.getMessage()]
    assert len(said) == 1 and f"spool {damaged}: damaged" in said[0], said
    assert damaged.read_bytes() == before
    assert metric(service, "ingest_spool_orphaned_messages") == 1
    assert adopter.opened == opened
    changed = damaged.stat().st_mtime_ns + 1_000_000_000
    os.utime(damaged, ns=(changed, changed))  # someone touched it: looked at again
    adopter.scan()
    assert adopter.opened == opened + 1 and metric(service, "ingest_spool_orphaned_messages") == 1


def test_a_lock_file_left_without_its_spool_file_is_removed_by_whoever_can_take_it(tmp_path) -> None:
    """A process killed between taking its lock and creating its file leaves only the lock file;
    one whose process lives (about to create its file) is left alone."""
    folder = tmp_path / "spool"
    folder.mkdir()
    stale = directory.lock_path(folder / "spool-killed-1.db")
    stale.touch()
    living = spool.claim(folder / "spool-starting-2.db")  # a live process, its file not made yet
    writer = SpoolWriter(directory.own_file(folder), sync="normal", max_bytes=1 << 30)
    writer.open()
    writer.start()
    try:
        SpoolAdopter(writer, folder).scan()
        assert not stale.exists()
        assert directory.lock_path(folder / "spool-starting-2.db").exists()
        living.close()  # that process died too, still before making its file
        SpoolAdopter(writer, folder).scan()
        assert sorted(p.name for p in folder.iterdir() if p.suffix == ".lock") == [writer.path.name + ".lock"]
    finally:
        living.close()
        writer.close()
        writer.join()
        writer.release()


def test_an_orphan_is_opened_once_to_be_counted_and_adopted(tmp_path) -> None:
    folder = tmp_path / "spool"
    folder.mkdir()
    writer = SpoolWriter(directory.own_file(folder), sync="normal", max_bytes=1 << 30)
    writer.open()
    writer.start()
    try:
        _orphan(folder / "spool-orphan.db", range(50), "r")
        adopter = SpoolAdopter(writer, folder)
        adopter.scan()
        assert (adopter.opened, adopter.adopted, adopter.orphaned) == (1, 50, 0)
        assert _files(folder) == [writer.path] and writer.messages == 50
    finally:
        writer.close()
        writer.join()
        writer.release()


def _worker_pids(parent: int) -> list[int]:
    """The `--workers` processes of `parent` (spawned: their command line says spawn_main)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                spawned = b"spawn_main" in (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if ppid == parent and spawned:
                found.append(int(entry.name))
    return found


@pytest.mark.timeout(240)
def test_two_workers_killed_with_kill_9_under_load_every_202_is_stored_once(
    make_engine, postgres_url, tmp_path
) -> None:
    engine = make_engine(postgres_url)
    folder = tmp_path / "spool"
    proxy = TcpProxy("127.0.0.1", urlsplit(postgres_url).port or 5432)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    sets: list[set[int]] = [set() for _ in range(3)]
    try:
        with serving(["--workers", "2", "--port", str(port), "--db", _via(proxy, postgres_url),
                      "--spool", f"{folder}/", "--queue-size", "500"], wait_ready=False) as workers:
            wait_until(lambda: any("(2 workers," in line for line in workers.log), 60, "two workers ready")
            pushers = [threading.Thread(target=_pusher, args=(url, sets[i], stop, i * 10_000_000), name=f"push-{i}")
                       for i in range(3)]
            for pusher in pushers:
                pusher.start()
            wait_until(lambda: _acked(sets) >= 2_000, 60, "2,000 acknowledged")
            proxy.cut()
            before = _acked(sets)
            wait_until(lambda: _acked(sets) >= before + 2_000, 60, "2,000 more acknowledged, spooled")
            children = _worker_pids(workers.process.pid)
            assert len(children) == 2, children
            for pid in [workers.process.pid, *children]:
                os.kill(pid, signal.SIGKILL)
            workers.wait(30)
            stop.set()
            for pusher in pushers:
                pusher.join(30)
        acked = set().union(*sets)
        assert len(_files(folder)) == 2 and sum(_messages_in(p) for p in _files(folder)) > 0
        proxy.restore()
        with serving(["--db", _via(proxy, postgres_url), "--spool", f"{folder}/"]) as after:
            wait_until(lambda: acked <= _stored_seqs(engine)[0], 90, "every acknowledged message stored")
            wait_until(lambda: len(_files(folder)) == 1, 30, "both workers' files adopted")
            assert sum("(its process is gone)" in line for line in after.log) == 2, "".join(after.log)
    finally:
        stop.set()
        proxy.close()
    seqs, rows = _stored_seqs(engine)
    assert acked <= seqs
    assert rows == len(seqs), f"{rows - len(seqs)} message(s) stored twice"
