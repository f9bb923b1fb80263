"""The Service: the order in which a built service's parts start and stop (builder.py builds them).

Start: open the spool (if any) → migrate → consumers check the database and meet at a Barrier →
       spool writer and feeder start → listener binds → ready. With a spool, a database that
       does not answer the migration does not stop the start: the consumers wait at the database
       gate (db/gate.py) instead, and the rest starts, accepting into the spool.
Run:   the main thread waits on the `stopping` Event and, between waits, replaces dead threads
       and does its chores (chores.py) and the gate's retries, none of which waits on the database.
Stop:  refuse new requests (503) → the spool commits what it was handed and the feeder feeds all
       of it → close the buffer → consumers drain and commit (bounded by the drain deadline:
       past it their connections are cut, and ABANDON_AFTER_S later any consumer the database
       still holds is left behind) → the spool deletes what was stored → listener finishes
       in-flight responses → pool closes. The listener stops last on purpose: clients awaiting
       their commits get answers. An explicit order, not reversed start order.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from types import TracebackType

from ingest.builder import WorkerSlot, build
from ingest.config import Settings
from ingest.consumers import ConsumerThread
from ingest.db import migrate
from ingest.db.gate import DatabaseGate
from ingest.errors import DatabaseUnreachable, SchemaNotReady, StartupError, first_line
from ingest.messages import Message
from ingest.shutdown import Shutdown
from ingest.spool.writer import KEPT_IN_SPOOL
from ingest.stream.stage import KEPT_IN_STREAM, StreamStage

__all__ = [
    "EXIT_DRAIN_TIMEOUT", "EXIT_LISTENER_DIED", "EXIT_OK", "EXIT_START_FAILED", "Service", "WorkerSlot",
    "collect_less_often",
]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_START_FAILED = 1  # as a failed start: the database answered the gate with the wrong schema
EXIT_DRAIN_TIMEOUT = 3  # the drain deadline passed: some accepted messages were not stored
EXIT_LISTENER_DIED = 4  # the listener, the spool writer or the spool feeder died

STARTUP_TIMEOUT_S = 30.0
CHECK_INTERVAL_S = 0.5
# Past the drain deadline every connection in use is cut; a consumer the database still holds
# this long after that (in connect(), say) is left behind, its batch accounted as not stored.
ABANDON_AFTER_S = 2.0


# The cyclic garbage collector's thresholds for a process that runs a service. CPython's default
# first threshold, 700 net allocations, ran a collection every few requests of 100 messages, and
# every tenth of those (and every hundredth: all of memory) walked every message waiting in the
# buffer and the spool's hand-off: in bench/run.py's NDJSON runs the collector took 20 % of the
# service's CPU in memory mode and 24 % with a spool (1.15 and 1.49 s of 5.65 and 6.24 s). With
# 10,000 it took 0.07 and 0.19 s. Messages hold no cycles; what does (exceptions, aiohttp's
# request objects) is still collected, a few hundred thousand allocations later.
GC_THRESHOLDS = (10_000, 10, 10)


def collect_less_often() -> None:
    """Once a process, before its service starts (serve, each worker, write)."""
    gc.set_threshold(*GC_THRESHOLDS)


class Service:
    def __init__(
        self, settings: Settings, shutdown: Shutdown | None = None, worker: WorkerSlot | None = None, *,
        listens: bool = True,
    ) -> None:
        self.settings = settings
        self.shutdown = shutdown or Shutdown()
        self.parts = build(settings, self.shutdown, worker, listens=listens)
        parts = self.parts
        # The parts the lifecycle (and the tests) use by name.
        self.metrics, self.buffer, self.pool, self.store = parts.metrics, parts.buffer, parts.pool, parts.store
        self.spool, self.ledger, self.throughput = parts.spool, parts.ledger, parts.throughput
        self.supervisor, self.listener, self.health, self.chores = (
            parts.supervisor, parts.listener, parts.health, parts.chores
        )
        self.gate = DatabaseGate(self._migrate, parts.database_open)
        self.port: int | None = None
        self._stopped = False

    def __repr__(self) -> str:
        return f"Service(port={self.port}, ready={self.health.ready()}, {self.buffer!r}, {self.supervisor!r})"

    @property
    def url(self) -> str:
        return f"{self.parts.scheme}://{self.settings.host}:{self.port}"

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        """Return once the whole pipeline works and the port is bound; StartupError otherwise."""
        self.supervisor.install()
        try:
            self.spool.open()
            checked = self._check_database()
            self._start_consumers(checked)
            self.spool.start()
            self._start_listener()
        except BaseException:
            self.stop()
            raise
        self.health.started.set()
        if self.parts.unprotected_warning is not None:
            log.warning("%s", self.parts.unprotected_warning)
        log.info("ingest ready on %s (%s, %d consumers, %s loop)%s", self.url, self.pool.dialect,
                 self.settings.consumers, self.listener.event_loop,
                 "" if checked else "; accepting into the spool, storing once the database answers")

    def _check_database(self) -> bool:
        """Migrate and check the schema; False when the database did not answer and a spool keeps
        what is accepted meanwhile (the gate then keeps trying)."""
        try:
            self._migrate()
        except DatabaseUnreachable as exc:
            if not self.spool.keeps_unstored:
                raise
            log.warning("%s: starting anyway; what is accepted waits in the spool until it answers", exc)
            self.gate.wait_for_database()
            return False
        self.gate.opened.set()
        return True

    def _migrate(self) -> None:
        """Upgrade the schema (unless --no-migrate), then insist it is the one this code writes."""
        try:
            if self.settings.migrate:
                migrate.upgrade(self.pool.engine)
            self.pool.ping()  # connected: a SQLite file exists now, empty or not
            migrate.check_at_head(self.pool.engine)
        except SchemaNotReady as exc:
            raise StartupError(f"database {exc}: run `ingest db upgrade` or start without --no-migrate") from None
        except Exception as exc:
            doing = "migrate" if self.settings.migrate else "read the schema revision of"
            raise DatabaseUnreachable(f"cannot {doing} the database: {first_line(exc)}") from exc

    def _start_consumers(self, checked: bool) -> None:
        """Each consumer checks the database and meets the others at a Barrier; unless the
        database did not answer (`checked` False): then they wait at the gate instead."""
        startup = threading.Barrier(self.settings.consumers + 1) if checked else None
        consumers = [self.parts.make_consumer(name, startup) for name in self.parts.consumer_names]
        self.supervisor.adopt(consumers)
        for consumer in consumers:
            consumer.start()
        if startup is None:
            return
        try:
            startup.wait(STARTUP_TIMEOUT_S)
        except threading.BrokenBarrierError:
            errors = {c.startup_error for c in consumers if c.startup_error}
            raise StartupError("; ".join(sorted(errors)) or "consumers did not start in time") from None

    def _start_listener(self) -> None:
        self.listener.start()
        try:
            self.port = self.listener.started.result(STARTUP_TIMEOUT_S)
        except OSError as exc:
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise StartupError(f"cannot listen on {self.settings.host}:{self.settings.port}: {reason}") from None

    # -- run ---------------------------------------------------------------------------------

    def run(self) -> int:
        """The main thread's loop until `stopping`; then stop. Returns the exit code."""
        while not self.shutdown.stopping.wait(CHECK_INTERVAL_S):
            dead = self.health.dead_thread()
            if dead is not None:
                # No replacement: a new listener would need the port, a new spool thread the
                # state the dead one held. Stop cleanly; a supervisor (Docker) restarts the process.
                return self._stop_for(EXIT_LISTENER_DIED, f"the {dead} thread died")
            self.supervisor.check()
            self.chores.tick()
            wrong = self.gate.tick()
            if wrong is not None:
                return self._stop_for(EXIT_START_FAILED, f"the database answered at last, but {wrong}")
        return self.stop()

    def _stop_for(self, code: int, why: str) -> int:
        """Stop on the main loop's own decision, with `code` whatever the drain does."""
        log.critical("%s; shutting down", why)
        self.shutdown.stopping.set()
        self.stop()
        return code

    # -- stop --------------------------------------------------------------------------------

    def stop(self) -> int:
        """Drain and stop every thread, upstream first; idempotent. Returns the exit code."""
        if self._stopped:
            return EXIT_OK
        self._stopped = True
        self.shutdown.stopping.set()  # new requests get 503 from here on
        self.shutdown.start_deadline(self.settings.drain_timeout_s)
        code = EXIT_OK
        try:
            self.spool.finish_feeding(self.supervisor.check)  # consumers must keep making room for the feeder
            self.buffer.close()  # puts still waiting for room fail with 503; nothing new gets in
            self._join_consumers()
            lost = self._give_up(self.buffer.take_all(), "the drain deadline passed")
            self.spool.close()
            unstored = lost or self.shutdown.hard_stop.is_set()
            code = EXIT_DRAIN_TIMEOUT if unstored and not self.spool.keeps_unstored else EXIT_OK
            self._stop_listener()
        finally:
            self.shutdown.cancel_deadline()
            self.parts.enqueue.shutdown(wait=True)
            self.chores.interrupt()  # only a receipt lookup or a probe in a stalled database holds one now
            # Left behind, not waited for: a lookup stuck connecting to a silent database holds no data.
            self.parts.lookups.shutdown(wait=False, cancel_futures=True)
            self.chores.close()
            self.gate.close()
            self.pool.dispose()
            self.supervisor.uninstall()
        if self.health.started.is_set():
            log.info("ingest stopped (exit code %d)", code)
        else:
            log.info("ingest did not start; stopped what had started")
        return code

    def _join_consumers(self) -> None:
        """Until every consumer has finished. A consumer that dies while draining hands its batch
        back; its replacement drains it. Past the deadline, whatever the database does, this
        returns within ABANDON_AFTER_S."""
        abandon_at: float | None = None
        while True:
            if self.shutdown.hard_stop.is_set():
                # Past the deadline a consumer may still be blocked inside the database.
                self.chores.interrupt()
                abandon_at = abandon_at or time.monotonic() + ABANDON_AFTER_S
            else:
                self.supervisor.check()
                self.chores.cut_overdue()
            pending = [c for c in self.supervisor.consumers() if c.is_alive()]
            if not pending:
                return
            if abandon_at is not None and time.monotonic() >= abandon_at:
                self._abandon(pending)
                return
            pending[0].join(CHECK_INTERVAL_S)

    def _abandon(self, consumers: list[ConsumerThread]) -> None:
        """Leave consumers the database still holds behind, accounting for what they held."""
        for consumer in consumers:
            batch = consumer.abandon()
            log.error("%s is still held by the database %.0fs past the drain deadline (connecting, or its cut "
                      "connection not yet noticed); leaving it behind with %d message(s) not stored",
                      consumer.name, ABANDON_AFTER_S, len(batch))
            self._give_up(batch, "the drain deadline passed while the database held their write")

    def _give_up(self, batch: list[Message], why: str) -> int:
        """Accepted messages that will not be stored by this process; returns how many are lost."""
        if batch and self.spool.keeps_unstored:
            # Not lost: every one of them is still in the spool file (or, unacked, in the stream).
            self.ledger.given_up(batch, KEPT_IN_STREAM if isinstance(self.spool, StreamStage) else KEPT_IN_SPOOL)
            return 0
        if batch:
            self.metrics.lost.inc(len(batch))
            self.ledger.given_up(batch, f"not stored: {why}")
            log.error("%d accepted message(s) were not stored: %s", len(batch), why)
        return len(batch)

    def _stop_listener(self) -> None:
        if self.listener.ident is None:
            return
        self.listener.stop()
        self.listener.join()

    def __enter__(self) -> Service:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

