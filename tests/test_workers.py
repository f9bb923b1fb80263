"""`ingest serve --workers N`: real processes on one port; metrics add up; a dead worker is replaced."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ingest.tools.push import PushOptions, run
from support.httpclient import request
from support.serving import ServeProcess, serving
from support.waiting import wait_until


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _metric(url: str, line_start: str) -> float | None:
    for line in request(f"{url}/metrics").body.decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == pid and b"spawn_main" in cmdline:
                found.append(int(entry.name))
    return found


@contextmanager
def _two_workers(tmp_path: Path) -> Iterator[tuple[ServeProcess, str]]:
    port = _free_port()
    with serving(["--workers", "2", "--port", str(port), "--db", f"sqlite:///{tmp_path / 'w.db'}"]) as proc:
        try:
            wait_until(lambda: any("ingest ready on" in line and "(2 workers," in line for line in proc.log), 60,
                       "the parent's ready line")
            yield proc, f"http://127.0.0.1:{port}"
        except BaseException as exc:
            raise AssertionError("ingest serve --workers 2 said:\n" + "".join(proc.log)) from exc


def test_workers_share_the_port_and_their_metrics_add_up(tmp_path) -> None:
    with _two_workers(tmp_path) as (proc, url):
        summary = run(PushOptions(url=url, count=3000, batch=10, concurrency=16))
        assert summary.ok, summary.format()
        stored = 'ingest_messages_stored_total'
        wait_until(lambda: _metric(url, stored) == 3000, 30, "3000 stored, as the merged metrics say")
        # Each scrape lands on either worker; every one of them must see both workers' counts.
        for _ in range(8):
            assert _metric(url, 'ingest_messages_received_total{client="anonymous"}') == 3000
            assert _metric(url, "ingest_consumers_configured") == 8
        proc.process.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert any("ingest stopped (2 workers, exit code 0)" in line for line in proc.log)


def test_a_killed_worker_is_noticed_counted_and_replaced(tmp_path) -> None:
    with _two_workers(tmp_path) as (proc, url):
        workers = wait_until(lambda: len(_children(proc.process.pid)) == 2 and _children(proc.process.pid), 10,
                             "two worker processes")
        os.kill(workers[0], signal.SIGKILL)
        wait_until(lambda: any("starting a replacement (1 so far)" in line for line in proc.log), 30, "the notice")
        wait_until(lambda: _metric(url, "ingest_worker_restarts") == 1, 30, "the restart counted")
        assert run(PushOptions(url=url, count=500, batch=10, concurrency=8)).ok
        proc.process.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_workers_need_a_port_and_a_spool_directory(tmp_path) -> None:
    base = [sys.executable, "-m", "ingest", "serve", "--workers", "2", "--db", f"sqlite:///{tmp_path / 'w.db'}"]
    for extra, says in (
        (["--port", "0"], "workers share one port: give --port (not 0) with --workers"),
        (["--port", str(_free_port()), "--spool", str(tmp_path / "s.db")],
         f"a spool file has one writer: with --workers, give --spool a directory (e.g. {tmp_path / 's.db'}.d/)"),
    ):
        done = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert says in done.stderr and "Traceback" not in done.stderr


def test_a_worker_that_cannot_start_stops_them_all_with_one_line(tmp_path) -> None:
    with socket.socket() as taken:  # bound without SO_REUSEPORT: no worker can share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "ingest", "serve", "--workers", "2", "--port", str(port),
             "--db", f"sqlite:///{tmp_path / 'w.db'}"],
            capture_output=True, text=True, timeout=120,
        )
    assert done.returncode == 1, done.stderr
    assert f"ingest: error: cannot listen on 127.0.0.1:{port}: address already in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_workers_drain_and_exit_when_the_parent_is_killed(tmp_path) -> None:
    with _two_workers(tmp_path) as (proc, url):
        workers = wait_until(lambda: len(_children(proc.process.pid)) == 2 and _children(proc.process.pid), 10,
                             "two worker processes")
        assert run(PushOptions(url=url, count=500, batch=10, concurrency=8)).ok
        proc.process.kill()
        wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 30, "the orphans gone")


def test_a_worker_says_ready_only_once_every_worker_has_started(tmp_path) -> None:
    """A client that connected to the first worker up would keep its connections there; so a
    worker's /readyz waits for the parent's word that all have started (WorkerSlot.all_started)."""
    import threading

    from ingest.config import Settings
    from ingest.service import Service, WorkerSlot

    all_started = threading.Event()
    settings = Settings.from_mapping({"port": 0, "db_url": f"sqlite:///{tmp_path / 'w.db'}", "consumers": 1})
    service = Service(settings, worker=WorkerSlot(0, str(tmp_path), 0, all_started))
    service.start()
    try:
        url = f"http://127.0.0.1:{service.port}"
        reply = request(f"{url}/readyz")
        assert (reply.status, reply.json()["ready"]) == (503, False)
        assert request(f"{url}/healthz").status == 200  # alive all the same
        all_started.set()
        reply = request(f"{url}/readyz")
        assert (reply.status, reply.json()["ready"]) == (200, True)
    finally:
        service.shutdown.stopping.set()
        service.stop()


def test_pinned_workers_keep_every_thread_to_a_cpu_of_their_own(tmp_path) -> None:
    """--pin-workers: each worker's threads (listener, consumers, ...) may run on one CPU only,
    and with as many CPUs as workers, not the same one."""
    allowed = sorted(os.sched_getaffinity(0))
    port = _free_port()
    args = ["--workers", "2", "--pin-workers", "--port", str(port), "--db", f"sqlite:///{tmp_path / 'w.db'}"]
    with serving(args) as proc:
        wait_until(lambda: any("ingest ready on" in line and "(2 workers," in line for line in proc.log), 60,
                   "the parent's ready line")
        workers = _children(proc.process.pid)
        assert len(workers) == 2, proc.log
        pinned = []
        for pid in workers:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
            assert len(tasks) > 3  # the listener and the consumers are there to be checked
            cpus = {(task / "status").read_text().split("Cpus_allowed_list:")[1].split()[0] for task in tasks}
            assert len(cpus) == 1, cpus
            pinned.append(cpus.pop())
        assert all(int(cpu) in allowed for cpu in pinned)
        if len(allowed) >= 2:
            assert pinned[0] != pinned[1]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_exit_when_the_parent_is_killed_while_they_start(tmp_path) -> None:
    """Killed before its workers are even ready, the parent leaves none behind: each knows its
    parent's pid from the parent itself, not from getppid() once the parent may be gone."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest", "serve", "--workers", "2", "--port", str(_free_port()),
         "--db", f"sqlite:///{tmp_path / 'w.db'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: len(_children(proc.pid)) == 2, 60, "two workers spawned")
        workers = _children(proc.pid)
    finally:
        proc.kill()
        proc.wait(10)
    wait_until(lambda: not any(_running(pid) for pid in workers), 60, "the orphaned workers gone")
