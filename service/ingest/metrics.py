"""Every metric ingest exports, owned by one registry per service (names are a contract)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REJECT_REASONS = ("invalid", "too_large", "unsupported", "queue_full", "shutting_down")
HTTP_CODES = ("200", "201", "202", "400", "404", "405", "413", "415", "500", "503")
THREADS = ("listener", "other")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


class Metrics:
    """Declares the metrics; gauges that read live state get their functions in service.py."""

    def __init__(self, consumer_names: list[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queue_depth = Gauge("ingest_queue_depth", "Messages waiting in the buffer", registry=r)
        self.queue_capacity = Gauge("ingest_queue_capacity", "Buffer capacity in messages", registry=r)
        self.received = Counter(
            "ingest_messages_received", "Messages accepted into the buffer", registry=r
        )
        self.stored = Counter("ingest_messages_stored", "Messages committed to the database", registry=r)
        self.rejected = Counter(
            "ingest_messages_rejected",
            "Messages refused at the door (1 per request when the body could not be split)",
            ["reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "ingest_batch_size", "Messages per batch taken by a consumer", buckets=_BATCH_BUCKETS, registry=r
        )
        self.db_write_seconds = Histogram(
            "ingest_db_write_seconds", "Time of one batch transaction that committed",
            buckets=_WRITE_BUCKETS, registry=r,
        )
        self.message_latency = Histogram(
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
        self.dead_lettered = Counter(
            "ingest_messages_dead_lettered", "Messages the database refused, kept in dead_letters", registry=r
        )
        self.lost = Counter(
            "ingest_messages_lost", "Accepted messages not stored when the drain deadline passed", registry=r
        )
        self.http_requests = Counter("ingest_http_requests", "HTTP responses by status code", ["code"], registry=r)
        # Pre-create label values so dashboards show 0, not "no data".
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for code in HTTP_CODES:
            self.http_requests.labels(code)
        for name in [*THREADS, *consumer_names]:
            self.thread_errors.labels(name)

