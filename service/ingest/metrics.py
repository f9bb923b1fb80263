"""Every metric ingest exports, owned by one registry per service (names are a contract)."""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ingest.vocabulary import REJECT_REASONS

ANONYMOUS = "anonymous"  # the client label when no token file is configured
HTTP_CODES = ("200", "201", "202", "400", "401", "404", "405", "408", "413", "415", "429", "500", "503", "504")
THREADS = ("listener", "other")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_PUBLISH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
STREAM_PUBLISH_ERRORS = ("full", "unavailable")
_BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


class Metrics:
    """Declares the metrics; gauges that read live state get their functions in service.py."""

    def __init__(self, consumer_names: list[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queue_depth = Gauge("ingest_queue_depth", "Messages waiting in the buffer", registry=r)
        self.queue_capacity = Gauge("ingest_queue_capacity", "Buffer capacity in messages", registry=r)
        self.received = ListenerCounter(
            "ingest_messages_received", "Messages accepted into the buffer, by client", "client", registry=r
        )
        self.stored = Counter("ingest_messages_stored", "Messages committed to the database", registry=r)
        self.spool_messages = Gauge("ingest_spool_messages", "Messages in the spool, not yet stored", registry=r)
        self.spool_bytes = Gauge("ingest_spool_bytes", "Bytes of the messages in the spool", registry=r)
        self.spool_orphaned_messages = Gauge(
            "ingest_spool_orphaned_messages",
            "Messages in spool files of the spool directory that no process owns, until adopted", registry=r)
        self.spool_capacity_bytes = Gauge(
            "ingest_spool_capacity_bytes", "The spool's bound in bytes (0: no spool)", registry=r
        )
        self.spool_commits = Counter(
            "ingest_spool_commits", "Group commits of the spool (an fsync each with --spool-sync full)", registry=r
        )
        self.duplicates = Counter(
            "ingest_messages_duplicate", "Messages not stored again: their identity was already stored", registry=r
        )
        self.rejected = Counter(
            "ingest_messages_rejected",
            "Messages refused at the door (1 per request when the body could not be split), by client",
            ["reason", "client"],
            registry=r,
        )
        self.batch_size = Histogram(
            "ingest_batch_size", "Messages per batch taken by a consumer", buckets=_BATCH_BUCKETS, registry=r
        )
        self.db_write_seconds = Histogram(
            "ingest_db_write_seconds", "Time of one batch transaction that committed",
            buckets=_WRITE_BUCKETS, registry=r,
        )
        self.message_latency = CountedHistogram(
            "ingest_message_latency_seconds", "From accepted by the listener to committed",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.pool_size = Gauge("ingest_db_pool_size", "Connections the pool may open", registry=r)
        self.pool_in_use = Gauge("ingest_db_pool_in_use", "Connections held by consumers", registry=r)
        self.pool_waiting = Gauge("ingest_db_pool_waiting", "Consumers waiting for a connection", registry=r)
        self.consumers_alive = Gauge("ingest_consumers_alive", "Consumer threads running", registry=r)
        self.consumers_configured = Gauge(
            "ingest_consumers_configured", "Consumer threads the service should run", registry=r
        )
        self.thread_errors = Counter(
            "ingest_thread_errors", "Uncaught exceptions that ended a thread", ["thread"], registry=r
        )
        self.consumer_restarts = Counter(
            "ingest_consumer_restarts", "Dead consumer threads replaced by the supervisor", registry=r
        )
        self.db_retries = Counter("ingest_db_retries", "Batch writes retried after a transient error", registry=r)
        self.db_calls_cut = Counter(
            "ingest_db_calls_cut", "Database calls whose connection was cut: past the statement timeout "
            "with no answer, or past the drain deadline", registry=r,
        )
        self.dead_lettered = Counter(
            "ingest_messages_dead_lettered", "Messages the database refused, kept in dead_letters", registry=r
        )
        self.requests_in_flight = Gauge(
            "ingest_requests_in_flight", "Accepted requests not yet all stored or dead-lettered (the receipts ledger)",
            registry=r,
        )
        self.worker_restarts = Gauge(
            "ingest_worker_restarts", "Worker processes (--workers) that died and were replaced", registry=r
        )
        self.dead_letters_waiting = Gauge(
            "ingest_dead_letters_waiting",
            "Rows in dead_letters (every replica's), waiting to be replayed or purged; counted every 15 s",
            registry=r,
        )
        self.lost = Counter(
            "ingest_messages_lost", "Accepted messages not stored when the drain deadline passed", registry=r
        )
        self.http_requests = ListenerCounter(
            "ingest_http_requests", "HTTP responses by status code", "code", registry=r
        )
        self.http_connections = Gauge("ingest_http_connections", "Client connections open", registry=r)
        # Every connection over --max-connections is either refused (told 503) or closed unanswered
        # (too_many); neither is in ingest_http_requests, which counts what the application answered.
        self.connections_refused = Counter(
            "ingest_http_connections_refused",
            "Connections over --max-connections whose request was answered 503 with Retry-After, then closed",
            registry=r,
        )
        self.connections_closed = Counter(
            "ingest_http_connections_closed",
            "Connections the guard closed unanswered: too_many (over --max-connections, with no answer "
            "possible or no request head in time), header_timeout",
            ["reason"], registry=r,
        )
        for reason in ("too_many", "header_timeout"):
            self.connections_closed.labels(reason)
        self._declare_stream(r)
        # Pre-create label values so dashboards show 0, not "no data".
        self.add_clients([ANONYMOUS])
        for code in HTTP_CODES:
            self.http_requests.add(int(code))
        for name in [*THREADS, *consumer_names]:
            self.thread_errors.labels(name)

    def _declare_stream(self, r: CollectorRegistry) -> None:
        """The stream buffer's (--buffer nats://): publishes timed on the listener, the stream's
        state polled every 2 s by listeners and writers alike (0 with the memory buffer)."""
        self.stream_publish_seconds = Histogram(
            "ingest_stream_publish_seconds", "From the first publish of a request to the stream's ack",
            buckets=_PUBLISH_BUCKETS, registry=r,
        )
        self.stream_publish_errors = Counter(
            "ingest_stream_publish_errors", "Requests the stream did not take: full (503 with Retry-After), "
            "unavailable (no definite answer in --enqueue-timeout: 503, outcome unknown)", ["reason"], registry=r,
        )
        for reason in STREAM_PUBLISH_ERRORS:
            self.stream_publish_errors.labels(reason)
        self.stream_publish_duplicates = Counter(
            "ingest_stream_publish_duplicates", "Publishes the stream had already (a retry after a lost ack)",
            registry=r,
        )
        self.stream_up = Gauge("ingest_stream_up", "1 when the last poll of the stream answered", registry=r)
        self.stream_messages = Gauge(
            "ingest_stream_messages", "Stream messages (each one or more whole requests) not yet stored", registry=r
        )
        self.stream_bytes = Gauge("ingest_stream_bytes", "Bytes of the stream messages in the stream", registry=r)
        self.stream_capacity_bytes = Gauge(
            "ingest_stream_capacity_bytes", "The stream's bound in bytes (max_bytes)", registry=r
        )
        self.stream_pending = Gauge(
            "ingest_stream_pending", "Stream messages not yet delivered to a writer", registry=r
        )
        self.stream_ack_pending = Gauge(
            "ingest_stream_ack_pending", "Stream messages delivered to writers and not yet acked (stored)", registry=r
        )
        self.stream_redelivered = Gauge(
            "ingest_stream_redelivered", "Stream messages delivered more than once and not yet acked", registry=r
        )
        self.stream_replicas = Gauge("ingest_stream_replicas", "Replicas the stream is configured with", registry=r)
        self.stream_replicas_current = Gauge(
            "ingest_stream_replicas_current", "Replicas of the stream that are current (the leader included)",
            registry=r,
        )

    def add_clients(self, names: list[str]) -> None:
        """Label values for these clients (bounded: the names in the token file, plus `unknown`)."""
        for name in names:
            self.received.add(name)
            for reason in REJECT_REASONS:
                self.rejected.labels(reason, name)

    def count_received(self, client: str, count: int) -> None:
        self.received.inc(client, count)

    def count_response(self, status: int) -> None:
        self.http_requests.inc(status)


class ListenerCounter(Collector):
    """A counter by one label that only the listener's loop thread counts, twice a request.

    A prometheus_client child's inc() takes a lock and three calls: about 1 µs each (1.0-1.05,
    measured in a loop on the benchmark's machine), where this one takes 0.2-0.3 µs.
    One writer needs no lock: /metrics copies the dict (one C call, under the GIL) and reads
    the copy. Label values are anything with str() (codes as ints: none formatted a request).
    """

    def __init__(self, name: str, documentation: str, label: str, registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._label = label
        self._counts: dict[object, float] = {}
        self._created: dict[object, float] = {}
        registry.register(self)

    def add(self, value: object) -> None:
        """Show this label value at 0 before anything is counted (idempotent; any thread)."""
        self._created.setdefault(value, time.time())
        self._counts.setdefault(value, 0)

    def inc(self, value: object, amount: float = 1) -> None:
        counts = self._counts
        if value not in counts:  # a value not added beforehand: a new client, an odd status
            self.add(value)
        counts[value] += amount

    def collect(self) -> Iterator[CounterMetricFamily]:
        counts, created = dict(self._counts), dict(self._created)
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, count in counts.items():
            family.add_metric([str(value)], count, created=created.get(value))
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._documentation, labels=[self._label])


class CountedHistogram(Collector):
    """A histogram whose observe() takes a count.

    A request's messages share one received_at, so they share one latency: observing it once
    with their count keeps the histogram per message at a fraction of the cost of one observe()
    each (prometheus_client's Histogram has no count argument).
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = [*buckets, float("inf")]
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._lock = threading.Lock()  # consumers observe concurrently; /metrics reads
        registry.register(self)

    def observe(self, value: float, count: int = 1) -> None:
        index = bisect_left(self._bounds, value)  # buckets are upper bounds, inclusive
        with self._lock:
            self._counts[index] += count
            self._sum += value * count

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, count in zip(self._bounds, counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
        yield HistogramMetricFamily(self._name, self._documentation, buckets=buckets, sum_value=total)

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self._name, self._documentation)
