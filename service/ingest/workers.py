"""`ingest serve --workers N`: N processes on one port, each a whole pipeline.

One listener thread is the ceiling of one process: it holds the GIL about half the time, and
waits for it much of the rest (docs/performance/benchmark.md). Worker processes each run a complete Service
(listener, buffer, consumers, pool) and bind the same port with SO_REUSEPORT, so the kernel
spreads connections among them; each has its own GIL.

The parent migrates the schema once, starts the workers, and waits until all of them are ready
(or reports the first one's start-up error and stops the rest); no worker says ready on /readyz
before then, so clients that wait for it find every worker listening. Then it supervises, as the main
thread of a single process supervises its consumers: a worker that exits while nobody asked it
to is logged, counted (`ingest_worker_restarts`, in the replacement's metrics) and replaced. On
SIGTERM or SIGINT the parent asks each worker to drain (one SIGTERM each; workers ignore SIGINT,
so a Ctrl-C reaches them once, through the parent); a second signal ends their drains now. The
exit code is the highest of the workers'. A parent killed outright leaves no orphans serving:
each worker watches for it and drains.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import replace
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue

from ingest.config import Settings, mask_url
from ingest.db import migrate
from ingest.db.pool import ConnectionPool
from ingest.errors import IngestError, SchemaNotReady, StartupError, first_line
from ingest.service import EXIT_OK, Service, WorkerSlot, collect_less_often
from ingest.shutdown import exit_process, on_signals

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 60.0
CHECK_INTERVAL_S = 0.5
RESTART_PAUSE_S = 1.0  # a worker that cannot start is not restarted in a tight loop
EXIT_WORKER_FAILED = 1


class Workers:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self._reports: Queue[tuple[int, str | None]] = self._context.Queue()  # (index, start-up error or None)
        self._all_started = self._context.Event()  # workers say ready (/readyz) once it is set
        self._socket_dir = tempfile.mkdtemp(prefix="ingest-workers-")
        self._processes: dict[int, SpawnProcess] = {}
        self._started_at: dict[int, float] = {}
        self._restarts = 0
        self._stopping = threading.Event()
        self._workers_migrate = False

    def __repr__(self) -> str:
        alive = sum(p.is_alive() for p in self._processes.values())
        return f"Workers({alive}/{self.settings.workers} alive, restarts={self._restarts})"

    def run(self) -> int:
        """Start, supervise until a signal, stop; the exit code of `ingest serve`."""
        self._install_signal_handlers()
        try:
            # Workers migrate only when this could not: the database was away, and a spool keeps
            # what they accept meanwhile (replacements too: the database may still be away).
            self._workers_migrate = self.settings.migrate and not self._migrate()
            for index in range(self.settings.workers):
                self._spawn(index)
            self._wait_ready()
            self._all_started.set()
            scheme = "https" if self.settings.tls_cert is not None else "http"
            log.info("ingest ready on %s://%s:%d (%d workers, %s)", scheme, self.settings.host, self.settings.port,
                     self.settings.workers, mask_url(self.settings.db_url))
            while not self._stopping.wait(CHECK_INTERVAL_S):
                self._replace_dead()
            return self._stop()
        except BaseException:
            self._stop()
            raise
        finally:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _migrate(self) -> bool:
        """Once, here: N workers migrating at once would race each other. Then one connection
        through the pool's set-up, so a SQLite file is in WAL mode before any worker opens it
        (switching takes a lock the workers would otherwise fight over at start).

        False: the database did not answer, and with a spool the workers start anyway, each
        accepting into its spool and migrating at its database gate once it answers (a
        migration that loses the race to another worker's rolls back and is tried again)."""
        pool = ConnectionPool(self.settings.db_url, 1)
        try:
            if self.settings.migrate:
                migrate.upgrade(pool.engine)
            pool.ping()
            migrate.check_at_head(pool.engine)
        except SchemaNotReady as exc:
            raise StartupError(f"database {exc}: run `ingest db upgrade` or start without --no-migrate") from None
        except Exception as exc:
            if self.settings.spool is None:
                raise StartupError(f"cannot prepare the database: {first_line(exc)}") from exc
            log.warning("cannot prepare the database: %s: starting the workers anyway; what they accept waits "
                        "in their spools until it answers", first_line(exc))
            return False
        finally:
            pool.dispose()
        return True

    def _spawn(self, index: int) -> None:
        slot = WorkerSlot(index, self._socket_dir, self._restarts, self._all_started)
        settings = replace(self.settings, migrate=self._workers_migrate)
        process = self._context.Process(
            target=_worker_main, args=(settings, slot, self._reports, os.getpid()),
            name=f"worker-{index}", daemon=False,
        )
        process.start()
        self._processes[index] = process
        self._started_at[index] = time.monotonic()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        ready: set[int] = set()
        while len(ready) < self.settings.workers:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.is_set():
                raise StartupError("workers did not start in time" if remaining <= 0 else "stopped during start-up")
            try:
                index, error = self._reports.get(timeout=min(remaining, CHECK_INTERVAL_S))
            except queue.Empty:  # look at the processes, then wait again
                dead = [i for i, p in self._processes.items() if p.exitcode is not None and i not in ready]
                if dead:
                    raise StartupError(f"worker-{dead[0]} exited during start-up (exit code "
                                       f"{self._processes[dead[0]].exitcode}); see its log") from None
                continue
            if error is not None:
                raise StartupError(error)
            ready.add(index)

    def _replace_dead(self) -> None:
        for index, process in list(self._processes.items()):
            if process.exitcode is None:
                continue
            if time.monotonic() - self._started_at[index] < RESTART_PAUSE_S:
                continue
            self._restarts += 1
            log.warning("worker-%d exited with code %s; starting a replacement (%d so far)",
                        index, process.exitcode, self._restarts)
            process.close()
            self._spawn(index)
        self._drain_reports()

    def _drain_reports(self) -> None:
        """Replacements report too; an error from one is logged (the next check replaces it)."""
        while True:
            try:
                index, error = self._reports.get_nowait()
            except queue.Empty:
                return
            if error is not None:
                log.error("worker-%d could not start: %s", index, error)

    def _stop(self) -> int:
        """One SIGTERM each (a drain), then wait; a second signal to the parent ends the drains."""
        self._stopping.set()
        self._terminate_running()
        codes = []
        for process in self._processes.values():
            while process.exitcode is None:
                process.join(CHECK_INTERVAL_S)
            codes.append(process.exitcode)
        self._processes.clear()
        worst = max((code for code in codes if code is not None), default=EXIT_OK)
        log.info("ingest stopped (%d workers, exit code %d)", len(codes), worst)
        return worst

    def _terminate_running(self) -> None:
        """SIGTERM to each worker still running: the first asks it to drain, a second ends that."""
        for process in self._processes.values():
            if process.exitcode is None:
                process.terminate()

    def _install_signal_handlers(self) -> None:
        """What signals mean (shutdown.on_signals), passed on to the workers."""

        def stop(again: bool) -> None:
            if again:  # impatient: end the workers' drains now
                self._terminate_running()
            self._stopping.set()

        def reload() -> None:  # each worker reads its token file again
            for process in self._processes.values():
                if process.pid is not None and process.exitcode is None:
                    os.kill(process.pid, signal.SIGHUP)

        on_signals(stop=stop, reload=reload)


def _worker_main(settings: Settings, slot: WorkerSlot, reports: Queue[tuple[int, str | None]], parent: int) -> None:
    """A worker process: a whole Service, started and run like `ingest serve` without --workers.

    `parent` is the parent's pid as the parent knew it: asking getppid() here instead would
    give init's if the parent was killed while this process was still starting, and the
    worker would then never see it gone (seen in a test that killed the parent that early)."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker-{slot.index}/%(threadName)s %(name)s: %(message)s",
    )
    try:
        if settings.pin_workers:
            _pin(slot.index)
        collect_less_often()
        service = Service(settings, worker=slot)
        service.shutdown.install_signal_handlers()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches a worker through the parent, once
        service.start()
    except IngestError as exc:
        reports.put((slot.index, str(exc)))
        sys.exit(EXIT_WORKER_FAILED)
    reports.put((slot.index, None))
    threading.Thread(target=_drain_when_orphaned, args=(service, parent), name="parent-watch",
                     daemon=True).start()
    exit_process(service.run())


def _pin(index: int) -> None:
    """--pin-workers: this worker's threads on one CPU, the index-th of those allowed (round robin).

    A worker's listener and consumers share one GIL, so at most one of them runs Python at a
    time; spread over cores, each hand-over also moves the data to another core's cache. With
    2 workers on 2 cores, alternated runs (wrk, 1 message a request) gave 62-69 µs of worker CPU
    a request pinned against 67-84 unpinned (docs/performance/benchmark.md). Off by default: on a large
    machine a worker's I/O threads may do better spread out."""
    if not hasattr(os, "sched_setaffinity"):
        raise StartupError("--pin-workers needs a system with sched_setaffinity (Linux)")
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[index % len(cpus)]
    try:
        os.sched_setaffinity(0, {cpu})  # this thread; the threads it starts next inherit it
    except OSError as exc:
        raise StartupError(f"cannot pin worker-{index} to CPU {cpu}: {exc}") from None
    log.info("worker-%d keeps to CPU %d", index, cpu)


def _drain_when_orphaned(service: Service, parent: int) -> None:
    """A parent killed outright (SIGKILL, OOM) cannot stop its workers: each notices it is gone
    and drains, rather than serving on unsupervised. Daemon: it holds nothing."""
    while not service.shutdown.stopping.wait(CHECK_INTERVAL_S):
        if os.getppid() != parent:
            log.error("the parent process is gone; draining and exiting")
            service.shutdown.stopping.set()
