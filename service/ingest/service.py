"""The Service: builds every stage from Settings, wires them, starts and stops them in order.

Start: open the spool (if any) → migrate → consumers check the database and meet at a Barrier →
       spool writer and feeder start → listener binds → ready.
Run:   the main thread waits on the `stopping` Event and, between waits, replaces dead threads
       and does its chores (chores.py), none of which waits on the database.
Stop:  refuse new requests (503) → the spool commits what it was handed and the feeder feeds all
       of it → close the buffer → consumers drain and commit (bounded by the drain deadline:
       past it their connections are cut, and ABANDON_AFTER_S later any consumer the database
       still holds is left behind) → the spool deletes what was stored → listener finishes
       in-flight responses → pool closes.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from prometheus_client import generate_latest

from ingest import metrics_merge, migrate, receipt_rows
from ingest.auth import UNKNOWN, Tokens
from ingest.buffer import Buffer
from ingest.chores import PROBE_TIMEOUT_S, Chores
from ingest.config import Settings
from ingest.consumers import ConsumerThread
from ingest.errors import SpoolError, StartupError
from ingest.guard import ConnectionGuard
from ingest.health import EventLike, Health
from ingest.identity import Generator
from ingest.listener import ListenerThread, loop_factory
from ingest.messages import Message, settle_failed, settle_failed_acks
from ingest.metrics import Metrics
from ingest.pace import Throughput
from ingest.pool import ConnectionPool
from ingest.ratelimit import RateLimiter
from ingest.receipts import Ledger
from ingest.routes import RouteConfig, hot_path, make_app
from ingest.shutdown import Shutdown
from ingest.spool_feeder import SpoolFeeder
from ingest.spool_writer import KEPT_IN_SPOOL, SpoolWriter
from ingest.store import Store, WriteResult
from ingest.supervisor import Supervisor
from ingest.tls import server_context

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_DRAIN_TIMEOUT = 3  # the drain deadline passed: some accepted messages were not stored
EXIT_LISTENER_DIED = 4  # the listener, the spool writer or the spool feeder died

STARTUP_TIMEOUT_S = 30.0
LOOKUP_TIMEOUT_S = 2.0  # a receipt the database does not give in this time comes from the ledger
CHECK_INTERVAL_S = 0.5
# Past the drain deadline every connection in use is cut; a consumer the database still holds
# this long after that (in connect(), say) is left behind, its batch accounted as not stored.
ABANDON_AFTER_S = 2.0


@dataclass(frozen=True)
class WorkerSlot:
    """This process is worker `index` of `ingest serve --workers N` (workers.py): it shares the
    port, and serves its metrics on a unix socket in `socket_dir` for its siblings to add up."""

    index: int
    socket_dir: str
    restarts: int = 0  # workers the parent has replaced so far, shown as ingest_worker_restarts
    # Set by the parent once every worker has started. Until then /readyz says not ready: a
    # client that connected to the first worker up would keep its connections there (the
    # kernel spreads connections among the sockets bound at the time), and one worker would
    # serve them all. None: no such wait (tests that make a slot by hand).
    all_started: EventLike | None = None

    @property
    def socket(self) -> str:
        return str(Path(self.socket_dir) / f"worker-{self.index}.sock")


class Service:
    def __init__(self, settings: Settings, shutdown: Shutdown | None = None, worker: WorkerSlot | None = None) -> None:
        self.settings = settings
        self.shutdown = shutdown or Shutdown()
        self.worker = worker
        self._consumer_names = [f"consumer-{n}" for n in range(1, settings.consumers + 1)]
        self.metrics = Metrics(self._consumer_names)
        self.tokens = Tokens(Path(settings.auth_tokens)) if settings.auth_tokens is not None else None
        if self.tokens is not None:
            self.metrics.add_clients([*self.tokens.names(), UNKNOWN])
        self.buffer = Buffer(settings.queue_size)
        self.pool = ConnectionPool(
            settings.db_url, settings.pool_size, statement_timeout_s=settings.statement_timeout_s
        )
        # The readiness probe's own connection: a busy pool never looks like a dead database.
        probe_pool = ConnectionPool(settings.db_url, 1, statement_timeout_s=PROBE_TIMEOUT_S,
                                    connect_timeout_s=int(PROBE_TIMEOUT_S))
        self.store = Store(self.pool, self.metrics, self.shutdown.hard_stop)
        self.spool: SpoolWriter | None = None
        if settings.spool is not None:
            self.spool = SpoolWriter(Path(settings.spool), sync=settings.spool_sync, max_bytes=settings.spool_max_bytes)
        self.feeder: SpoolFeeder | None = None
        self.throughput = Throughput()
        self.ledger = Ledger()
        self.supervisor = Supervisor(
            self._make_consumer,
            self.metrics.thread_errors,
            self.metrics.consumer_restarts,
            {"listener", *self._consumer_names},
        )
        self._executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="enqueue")
        # Receipt lookups get threads of their own: a stalled database must not hold enqueues.
        self._lookups = ThreadPoolExecutor(max_workers=2, thread_name_prefix="receipts")
        ssl_context = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            ssl_context = server_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        self.unprotected_warning = self._unprotected_warning()
        self.guard = ConnectionGuard(
            max_connections=settings.max_connections, header_timeout_s=settings.header_timeout_s, metrics=self.metrics
        )
        route_config = self._route_config()
        self.listener = ListenerThread(
            make_app(route_config), settings.host, settings.port, hot_path=hot_path(route_config),
            shutdown_timeout_s=settings.drain_timeout_s, guard=self.guard,
            keepalive_timeout_s=settings.keepalive_timeout_s, ssl_context=ssl_context,
            reuse_port=worker is not None, new_loop=loop_factory(settings.event_loop),
            private_metrics=(worker.socket, self._exposition) if worker is not None else None,
        )
        self.scheme = "https" if ssl_context is not None else "http"
        self.port: int | None = None
        self.health = Health(
            listener=self.listener, spool_threads=lambda: [self.spool, self.feeder], supervisor=self.supervisor,
            consumers=settings.consumers, store=self.store, stopping=self.shutdown.stopping,
            siblings_started=worker.all_started if worker is not None else None,
        )
        self.chores = Chores(
            store=self.store, pool=self.pool, probe_pool=probe_pool, metrics=self.metrics, shutdown=self.shutdown,
            tokens=self.tokens, lookups=self._lookups,
        )
        self.abandoned: list[str] = []  # consumers left blocked in the database at the stop
        self._stopped = False
        self._wire_gauges()

    def __repr__(self) -> str:
        return f"Service(port={self.port}, ready={self.health.ready()}, {self.buffer!r}, {self.supervisor!r})"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.settings.host}:{self.port}"

    def _route_config(self) -> RouteConfig:
        return RouteConfig(
            buffer=self.buffer,
            metrics=self.metrics,
            executor=self._executor,
            enqueue_timeout_s=self.settings.enqueue_timeout_s,
            max_body_bytes=self.settings.max_body_bytes,
            default_ack=self.settings.ack,
            id_field=self.settings.id_field,
            identities=Generator(),
            spool=self.spool,
            tokens=self.tokens,
            metrics_token=self.settings.metrics_token,
            unprotected_warning=self.unprotected_warning,
            guard=self.guard,
            body_timeout_s=self.settings.body_timeout_s,
            retry_after_s=self.throughput.retry_after_s,
            ledger=self.ledger,
            lookup_receipt=lambda request_id: receipt_rows.lookup(self.pool, request_id),
            lookups=self._lookups,
            lookup_timeout_s=LOOKUP_TIMEOUT_S,
            merge_metrics=self._merge_metrics if self.worker is not None else None,
            rate_limiter=(
                RateLimiter(self.settings.rate_limit, self.settings.rate_burst or self.settings.rate_limit)
                if self.settings.rate_limit is not None else None
            ),
            is_stopping=self.shutdown.stopping.is_set,
            # Late-bound: health is built after the listener, which needs these routes.
            is_healthy=lambda: self.health.healthy(),  # noqa: PLW0108
            not_ready=lambda: self.health.not_ready(),  # noqa: PLW0108
        )

    def _exposition(self) -> bytes:
        return generate_latest(self.metrics.registry)

    async def _merge_metrics(self, own: str) -> str:
        assert self.worker is not None
        return metrics_merge.merge(await metrics_merge.gather(self.worker.socket_dir, self.worker.socket, own))

    def _unprotected_warning(self) -> str | None:
        """Said at start and by /readyz when anyone who can reach a non-loopback port may push."""
        if self.tokens is not None or _loopback(self.settings.host):
            return None
        return f"no --auth-tokens: anyone who can reach {self.settings.host} may push messages"

    def _wire_gauges(self) -> None:
        m = self.metrics
        m.queue_depth.set_function(self.buffer.depth)
        m.queue_capacity.set(self.settings.queue_size)
        m.pool_size.set(self.settings.pool_size)
        m.pool_in_use.set_function(lambda: self.pool.in_use)
        m.pool_waiting.set_function(lambda: self.pool.waiting)
        m.consumers_alive.set_function(self.supervisor.alive)
        m.consumers_configured.set(self.settings.consumers)
        m.http_connections.set_function(lambda: self.guard.open_connections)
        m.requests_in_flight.set_function(lambda: len(self.ledger))
        m.worker_restarts.set(self.worker.restarts if self.worker is not None else 0)
        if self.spool is not None:
            spool = self.spool
            m.spool_messages.set_function(lambda: spool.messages)
            m.spool_bytes.set_function(lambda: spool.bytes)
            m.spool_capacity_bytes.set(spool.max_bytes)

    def _make_consumer(self, name: str, startup: threading.Barrier | None = None) -> ConsumerThread:
        return ConsumerThread(
            name,
            buffer=self.buffer,
            store=self.store,
            metrics=self.metrics,
            batch_size=self.settings.batch_size,
            linger_s=self.settings.batch_linger_s,
            hard_stop=self.shutdown.hard_stop,
            startup=startup,
            on_settled=self._settled,
        )

    def _settled(self, batch: list[Message], result: WriteResult) -> None:
        """A consumer's batch is in the database: pace the Retry-After, settle its receipts here,
        free the spool's rows."""
        self.ledger.settle(
            (m.receipt for group in (result.stored, result.duplicates) for m in group),
            (m.receipt for m, _ in result.dead),
        )
        self.throughput.record(len(batch))
        if self.spool is not None:
            self.spool.forget(batch)

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        """Return once the whole pipeline works and the port is bound; StartupError otherwise."""
        self.supervisor.install()
        try:
            self._open_spool()
            self._migrate()
            self._start_consumers()
            self._start_spool()
            self._start_listener()
        except BaseException:
            self.stop()
            raise
        self.health.started.set()
        if self.unprotected_warning is not None:
            log.warning("%s", self.unprotected_warning)
        log.info("ingest ready on %s (%s, %d consumers, %s loop)", self.url, self.pool.dialect,
                 self.settings.consumers, self.listener.event_loop)

    def _open_spool(self) -> None:
        if self.spool is None:
            return
        try:
            found = self.spool.open()
        except SpoolError as exc:
            raise StartupError(str(exc)) from None
        if found.messages:
            log.info("spool %s: recovered %d message(s) from a previous run; storing them first",
                     self.spool.path, found.messages)

    def _start_spool(self) -> None:
        if self.spool is None:
            return
        self.spool.start()
        self.feeder = SpoolFeeder(
            self.spool, self.buffer, chunk=self.settings.batch_size * 2, hard_stop=self.shutdown.hard_stop,
            ledger=self.ledger,
        )
        self.feeder.start()

    def _migrate(self) -> None:
        """Upgrade the schema (unless --no-migrate), then insist it is the one this code writes."""
        try:
            if self.settings.migrate:
                migrate.upgrade(self.pool.engine)
            current = migrate.current(self.pool.engine)
        except Exception as exc:
            doing = "migrate" if self.settings.migrate else "read the schema revision of"
            raise StartupError(f"cannot {doing} the database: {str(exc).splitlines()[0]}") from exc
        if current != migrate.head():
            raise StartupError(
                f"database schema is at revision {current or 'none'}, this ingest needs {migrate.head()}: "
                "run `ingest db upgrade` or start without --no-migrate"
            )

    def _start_consumers(self) -> None:
        startup = threading.Barrier(self.settings.consumers + 1)
        consumers = [self._make_consumer(name, startup) for name in self._consumer_names]
        self.supervisor.adopt(consumers)
        for consumer in consumers:
            consumer.start()
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
                log.critical("the %s thread died; shutting down", dead)
                self.shutdown.stopping.set()
                self.stop()
                return EXIT_LISTENER_DIED
            self.supervisor.check()
            self.chores.tick()
        return self.stop()

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
            self._finish_feeding()
            self.buffer.close()  # puts still waiting for room fail with 503; nothing new gets in
            self._join_consumers()
            lost = self._give_up(self.buffer.take_all(), "the drain deadline passed")
            self._close_spool()
            spooled = self.spool is not None
            code = EXIT_DRAIN_TIMEOUT if not spooled and (lost or self.shutdown.hard_stop.is_set()) else EXIT_OK
            self._stop_listener()
        finally:
            self.shutdown.cancel_deadline()
            self._executor.shutdown(wait=True)
            self.chores.interrupt()  # only a receipt lookup or a probe in a stalled database holds one now
            # Left behind, not waited for: a lookup stuck connecting to a silent database holds no data.
            self._lookups.shutdown(wait=False, cancel_futures=True)
            self.chores.close()
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
            log.error("%s is still held by the database %.0fs after the drain deadline, its connection cut; "
                      "leaving it behind with %d message(s) not stored", consumer.name, ABANDON_AFTER_S, len(batch))
            self._give_up(batch, "the drain deadline passed while the database held their write")
            self.abandoned.append(consumer.name)

    def _finish_feeding(self) -> None:
        """With a spool: commit what was handed over, then feed all of it before the buffer closes."""
        if self.spool is None:
            return
        self.spool.stop_accepting()
        if self.feeder is None or self.feeder.ident is None:
            return
        self.feeder.finish()
        while self.feeder.is_alive():
            self.supervisor.check()  # consumers must keep making room for the feeder
            self.feeder.join(CHECK_INTERVAL_S)

    def _close_spool(self) -> None:
        if self.spool is None:
            return
        if self.spool.ident is None:
            self.spool.release()  # opened (maybe) but never started: let the file go
            return
        self.spool.close()  # after the consumers: their last deletions are committed first
        self.spool.join()
        self.spool.release()
        settle_failed_acks(self.spool.orphaned_acks(), KEPT_IN_SPOOL)
        if self.spool.messages:
            log.warning("spool %s: %d message(s) stay in the spool; the next start stores them",
                        self.spool.path, self.spool.messages)

    def _give_up(self, batch: list[Message], why: str) -> int:
        """Accepted messages that will not be stored by this process; returns how many are lost."""
        if batch and self.spool is not None:
            # Not lost: every one of them is still in the spool file.
            settle_failed(batch, KEPT_IN_SPOOL)
            return 0
        if batch:
            self.metrics.lost.inc(len(batch))
            settle_failed(batch, f"not stored: {why}")
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


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything
