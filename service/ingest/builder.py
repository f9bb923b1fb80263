"""Wiring: every part of a service built from Settings, connected, and not started.

`build()` returns the parts as plain values; `Service` (service.py) receives them and owns only
the order in which they start and stop. Nothing here starts a thread, opens a socket or touches
the database: a test can build the parts, look at them, and drive one by hand.
"""

from __future__ import annotations

import ipaddress
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from aiohttp import web
from prometheus_client import generate_latest

from ingest import metrics_merge
from ingest.buffer import Buffer
from ingest.chores import PROBE_TIMEOUT_S, Chores
from ingest.config import Settings
from ingest.consumers import ConsumerThread
from ingest.db import receipt_rows
from ingest.db.pool import ConnectionPool
from ingest.db.store import Store, WriteResult
from ingest.health import EventLike, Health
from ingest.http.auth import UNKNOWN, Tokens
from ingest.http.context import RouteConfig
from ingest.http.guard import ConnectionGuard
from ingest.http.identity import Generator
from ingest.http.listener import ListenerThread, loop_factory
from ingest.http.ratelimit import RateLimiter
from ingest.http.routes import hot_path, make_app
from ingest.http.tls import server_context
from ingest.intake import BufferIntake, Intake, SpoolIntake
from ingest.messages import Message
from ingest.metrics import Metrics
from ingest.pace import Throughput
from ingest.receipts import Ledger
from ingest.shutdown import Shutdown
from ingest.spool import directory as spool_directory
from ingest.spool.stage import NoSpool, SpoolStage
from ingest.spool.writer import SpoolWriter
from ingest.stream.intake import StreamIntake
from ingest.stream.spec import StreamSpec
from ingest.stream.stage import StreamStage
from ingest.supervisor import Supervisor

LOOKUP_TIMEOUT_S = 2.0  # a receipt the database does not give in this time comes from the ledger
ENQUEUE_THREADS = 32  # puts that wait for room, off the event loop
LOOKUP_THREADS = 2  # receipt lookups and the dead-letters count: a stalled database holds no enqueue


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


class MakeConsumer(Protocol):
    def __call__(self, name: str, startup: threading.Barrier | None = None) -> ConsumerThread: ...


@dataclass(frozen=True, kw_only=True)
class Parts:
    """A service's parts, built and connected; the lifecycle (service.py) starts and stops them."""

    settings: Settings
    shutdown: Shutdown
    metrics: Metrics
    tokens: Tokens | None
    buffer: Buffer
    pool: ConnectionPool
    store: Store
    spool: SpoolStage | StreamStage | NoSpool  # the stage between the listener and the buffer, if any
    throughput: Throughput
    ledger: Ledger
    consumer_names: list[str]
    make_consumer: MakeConsumer
    database_open: threading.Event
    supervisor: Supervisor
    enqueue: ThreadPoolExecutor
    lookups: ThreadPoolExecutor
    guard: ConnectionGuard
    listener: ListenerThread
    scheme: str
    unprotected_warning: str | None
    health: Health
    chores: Chores


def build(settings: Settings, shutdown: Shutdown, worker: WorkerSlot | None = None, *, listens: bool = True) -> Parts:
    """`listens`: False for a writer (`ingest write`): its port serves /metrics, /healthz and /readyz."""
    consumer_names = [f"consumer-{n}" for n in range(1, settings.consumers + 1)]
    metrics = Metrics(consumer_names)
    tokens = Tokens(Path(settings.auth_tokens)) if settings.auth_tokens is not None else None
    if tokens is not None:
        metrics.add_clients([*tokens.names(), UNKNOWN])
    buffer = Buffer(settings.queue_size)
    pool = ConnectionPool(settings.db_url, settings.pool_size, statement_timeout_s=settings.statement_timeout_s)
    # The readiness probe's own connection: a busy pool never looks like a dead database.
    probe_pool = ConnectionPool(settings.db_url, 1, statement_timeout_s=PROBE_TIMEOUT_S,
                                connect_timeout_s=int(PROBE_TIMEOUT_S))
    store = Store(pool, metrics, shutdown.hard_stop)
    throughput = Throughput()
    ledger = Ledger()
    enqueue = ThreadPoolExecutor(max_workers=ENQUEUE_THREADS, thread_name_prefix="enqueue")
    lookups = ThreadPoolExecutor(max_workers=LOOKUP_THREADS, thread_name_prefix="receipts")
    spool: SpoolStage | StreamStage | NoSpool
    intake: Intake
    if settings.buffer_servers:
        spool, intake = _stream_and_intake(settings, shutdown, buffer, ledger, store, metrics, listens)
    else:
        spool, intake = _spool_and_intake(settings, shutdown, buffer, ledger, throughput, enqueue)
    after_commit = _after_commit(throughput, spool)
    database_open = threading.Event()  # the database gate (db/gate.py): set once the start's check passed
    make_consumer = _consumer_factory(settings, shutdown, buffer, store, metrics, ledger, after_commit, database_open)
    supervisor = Supervisor(make_consumer, metrics.thread_errors, metrics.consumer_restarts,
                            {"listener", *consumer_names})
    guard = ConnectionGuard(
        max_connections=settings.max_connections, header_timeout_s=settings.header_timeout_s, metrics=metrics
    )
    health = Health(
        spool_threads=spool.threads, supervisor=supervisor, consumers=settings.consumers, store=store,
        stopping=shutdown.stopping, siblings_started=worker.all_started if worker is not None else None,
        stream_unreachable=(lambda: intake.unreachable) if isinstance(intake, StreamIntake) else None,
    )
    unprotected_warning = _unprotected_warning(settings, tokens)
    routes = RouteConfig(
        intake=intake,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        default_ack=settings.ack,
        id_field=settings.id_field,
        identities=Generator(),
        tokens=tokens,
        metrics_token=settings.metrics_token,
        unprotected_warning=unprotected_warning,
        guard=guard,
        body_timeout_s=settings.body_timeout_s,
        ledger=ledger,
        lookup_receipt=lambda request_id, client: receipt_rows.lookup(pool, request_id, client),
        lookups=lookups,
        lookup_timeout_s=LOOKUP_TIMEOUT_S,
        merge_metrics=_merger(worker) if worker is not None else None,
        rate_limiter=(
            RateLimiter(settings.rate_limit, settings.rate_burst or settings.rate_limit)
            if settings.rate_limit is not None else None
        ),
        is_stopping=shutdown.stopping.is_set,
        is_healthy=health.healthy,
        not_ready=health.not_ready,
    )
    ssl_context = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        ssl_context = server_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    lifespan = intake.lifespan if isinstance(intake, StreamIntake) else None
    listener = _listener(settings, routes, guard, metrics, ssl_context, worker, lifespan)
    health.watch(listener)
    chores = Chores(store=store, pool=pool, probe_pool=probe_pool, metrics=metrics, shutdown=shutdown, tokens=tokens,
                    lookups=lookups)
    parts = Parts(
        settings=settings, shutdown=shutdown, metrics=metrics, tokens=tokens, buffer=buffer, pool=pool, store=store,
        spool=spool, throughput=throughput, ledger=ledger, consumer_names=consumer_names,
        make_consumer=make_consumer, database_open=database_open, supervisor=supervisor,
        enqueue=enqueue, lookups=lookups, guard=guard,
        listener=listener, scheme="https" if ssl_context is not None else "http",
        unprotected_warning=unprotected_warning, health=health, chores=chores,
    )
    _wire_gauges(parts, worker)
    return parts


def _spool_and_intake(
    settings: Settings, shutdown: Shutdown, buffer: Buffer, ledger: Ledger, throughput: Throughput,
    enqueue: ThreadPoolExecutor,
) -> tuple[SpoolStage | NoSpool, Intake]:
    """The spool stage and the way in: with --spool, 202 once on disk; else once in the buffer."""
    if settings.spool is None:
        intake = BufferIntake(buffer, executor=enqueue, enqueue_timeout_s=settings.enqueue_timeout_s,
                              retry_after_s=throughput.retry_after_s)
        return NoSpool(), intake
    folder = settings.spool_directory  # with a directory, this process's own file in it
    path = spool_directory.own_file(folder) if folder is not None else Path(settings.spool)
    # The hand-off to the feeder holds as many messages as the buffer (at least what the feeder
    # takes at once, SpoolStage's chunk): a backlog up to twice the buffer is fed as the listener
    # made it; past that the feeder reads the file and makes every message again (with 2 batches,
    # 16-84 % of NDJSON requests under bench/run.py were read back), and memory stays bounded.
    writer = SpoolWriter(path, sync=settings.spool_sync, max_bytes=settings.spool_max_bytes,
                         hand_off=max(2 * settings.batch_size, settings.queue_size))
    stage = SpoolStage(writer, buffer=buffer, batch_size=settings.batch_size, hard_stop=shutdown.hard_stop,
                       ledger=ledger, directory=folder)
    return stage, SpoolIntake(writer, retry_after_s=throughput.retry_after_s)


def stream_spec(settings: Settings) -> StreamSpec:
    """The stream a nats:// buffer's settings name: one home for `serve`, `write` and `stream`."""
    return StreamSpec(
        servers=settings.buffer_servers, name=settings.stream, replicas=settings.stream_replicas,
        max_bytes=settings.stream_max_bytes, max_body_bytes=settings.max_body_bytes,
        ack_wait_s=settings.stream_ack_wait_s,
    )


def _stream_and_intake(
    settings: Settings, shutdown: Shutdown, buffer: Buffer, ledger: Ledger, store: Store, metrics: Metrics,
    listens: bool,
) -> tuple[StreamStage, StreamIntake]:
    """--buffer nats://: 202 once the stream has the request; writers (--consumers > 0) feed from it."""
    spec = stream_spec(settings)
    stage = StreamStage(spec, writers=settings.consumers > 0, buffer=buffer, ledger=ledger,
                        hard_stop=shutdown.hard_stop, database_failing=lambda: store.database_error is not None,
                        new_loop=loop_factory(settings.event_loop))
    intake = StreamIntake(spec, ledger=ledger, metrics=metrics, enqueue_timeout_s=settings.enqueue_timeout_s,
                          commit_timeout_s=settings.commit_timeout_s, accepting=listens)
    return stage, intake


def _listener(
    settings: Settings, routes: RouteConfig, guard: ConnectionGuard, metrics: Metrics,
    ssl_context: ssl.SSLContext | None, worker: WorkerSlot | None,
    lifespan: Callable[[web.Application], AsyncIterator[None]] | None = None,
) -> ListenerThread:
    app = make_app(routes)
    if lifespan is not None:
        app.cleanup_ctx.append(lifespan)  # on the listener's loop: before the port opens, after the last reply
    return ListenerThread(
        app, settings.host, settings.port, hot_path=hot_path(routes),
        shutdown_timeout_s=settings.drain_timeout_s, guard=guard,
        keepalive_timeout_s=settings.keepalive_timeout_s, ssl_context=ssl_context,
        reuse_port=worker is not None, new_loop=loop_factory(settings.event_loop),
        private_metrics=(worker.socket, lambda: generate_latest(metrics.registry)) if worker is not None else None,
    )


def _consumer_factory(
    settings: Settings, shutdown: Shutdown, buffer: Buffer, store: Store, metrics: Metrics, ledger: Ledger,
    after_commit: Callable[[list[Message], WriteResult], None], database_open: threading.Event,
) -> MakeConsumer:
    def make(name: str, startup: threading.Barrier | None = None) -> ConsumerThread:
        return ConsumerThread(
            name, buffer=buffer, store=store, metrics=metrics, ledger=ledger, batch_size=settings.batch_size,
            linger_s=settings.batch_linger_s, hard_stop=shutdown.hard_stop, startup=startup,
            database_open=database_open, after_commit=after_commit,
        )

    return make


def _after_commit(
    throughput: Throughput, spool: SpoolStage | StreamStage | NoSpool,
) -> Callable[[list[Message], WriteResult], None]:
    """What else a consumer does once its batch is in the database: pace the Retry-After, free
    the spool's rows, ack the stream's requests."""

    def settled(batch: list[Message], result: WriteResult) -> None:
        throughput.record(len(batch))
        spool.forget(batch)
        if isinstance(spool, StreamStage):
            spool.settled(result.stored, result.duplicates, [m for m, _ in result.dead])

    return settled


def _merger(worker: WorkerSlot) -> Callable[[str], Awaitable[str]]:
    async def merge(own: str) -> str:
        return metrics_merge.merge(await metrics_merge.gather(worker.socket_dir, worker.socket, own))

    return merge


def _unprotected_warning(settings: Settings, tokens: Tokens | None) -> str | None:
    """Said at start and by /readyz when anyone who can reach a non-loopback port may push."""
    if tokens is not None or _loopback(settings.host):
        return None
    return f"no --auth-tokens: anyone who can reach {settings.host} may push messages"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _wire_gauges(parts: Parts, worker: WorkerSlot | None) -> None:
    m, settings, pool = parts.metrics, parts.settings, parts.pool
    m.queue_depth.set_function(parts.buffer.depth)
    m.queue_capacity.set(settings.queue_size)
    m.pool_size.set(settings.pool_size)
    m.pool_in_use.set_function(lambda: pool.in_use)
    m.pool_waiting.set_function(lambda: pool.waiting)
    m.consumers_alive.set_function(parts.supervisor.alive)
    m.consumers_configured.set(settings.consumers)
    m.http_connections.set_function(lambda: parts.guard.open_connections)
    m.requests_in_flight.set_function(lambda: len(parts.ledger))
    m.worker_restarts.set(worker.restarts if worker is not None else 0)
    if isinstance(parts.spool, SpoolStage):
        stage, writer = parts.spool, parts.spool.writer
        m.spool_messages.set_function(lambda: writer.messages)
        m.spool_bytes.set_function(lambda: writer.bytes)
        m.spool_capacity_bytes.set(writer.max_bytes)
        m.spool_orphaned_messages.set_function(lambda: stage.orphaned)
        writer.count_commit = m.spool_commits.inc
