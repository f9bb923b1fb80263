"""What `ingest top` reads: one scrape of /metrics, parsed into the figures the screen shows.

Everything that can go wrong with a scrape (the network, the format) is here and ends as a
ClientError or a Snapshot, so the screen (screen.py) only ever formats numbers it was given.
"""

from __future__ import annotations

import math
import ssl
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ingest.errors import ClientError


@dataclass(frozen=True)
class Histogram:
    """A Prometheus histogram as exposed: cumulative counts per upper bound, +Inf last."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    sum: float

    def since(self, earlier: Histogram) -> Histogram:
        """The observations made between `earlier` and this scrape."""
        before = dict(earlier.buckets)
        return Histogram(
            buckets=tuple((le, n - before.get(le, 0.0)) for le, n in self.buckets),
            count=self.count - earlier.count,
            sum=self.sum - earlier.sum,
        )

    def quantile(self, q: float) -> float | None:
        """Estimate as PromQL's histogram_quantile does: linear within the bucket that holds it.

        A quantile that falls in the +Inf bucket is reported as the largest finite bound, the
        most the buckets can tell. None when there are no observations.
        """
        total = self.buckets[-1][1] if self.buckets else 0.0
        if total <= 0:
            return None
        rank = q * total
        lower, below = 0.0, 0.0
        for upper, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(upper):
                    return lower
                if cumulative == below:
                    return upper
                return lower + (upper - lower) * (rank - below) / (cumulative - below)
            lower, below = upper, cumulative
        return lower


@dataclass(frozen=True)
class Snapshot:
    """The figures of one scrape that `ingest top` shows; None when the service exports no such metric."""

    received: float | None = None
    stored: float | None = None
    dead_lettered: float | None = None
    db_retries: float | None = None
    consumer_restarts: float | None = None
    queue_depth: float | None = None
    queue_capacity: float | None = None
    pool_size: float | None = None
    pool_in_use: float | None = None
    pool_waiting: float | None = None
    consumers_alive: float | None = None
    consumers_configured: float | None = None
    thread_errors: Mapping[str, float] = field(default_factory=dict)
    rejected: Mapping[str, float] = field(default_factory=dict)
    http_responses: Mapping[str, float] = field(default_factory=dict)
    latency: Histogram | None = None
    db_write: Histogram | None = None
    batch_size: Histogram | None = None


def parse_snapshot(text: str) -> Snapshot:
    """Read Prometheus text exposition into a Snapshot; ValueError if it is not that format."""
    by_name: dict[str, list[Sample]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            by_name[sample.name].append(sample)

    def total(name: str) -> float | None:
        samples = by_name.get(name)
        return sum(s.value for s in samples) if samples else None

    def per_label(name: str, label: str) -> dict[str, float]:
        values: dict[str, float] = defaultdict(float)
        for s in by_name.get(name, ()):
            values[s.labels.get(label, "")] += s.value
        return dict(values)

    def histogram(name: str) -> Histogram | None:
        buckets = per_label(f"{name}_bucket", "le")
        if not buckets:
            return None
        ordered = sorted((float(le), n) for le, n in buckets.items())
        return Histogram(
            buckets=tuple(ordered),
            count=total(f"{name}_count") or 0.0,
            sum=total(f"{name}_sum") or 0.0,
        )

    return Snapshot(
        received=total("ingest_messages_received_total"),
        stored=total("ingest_messages_stored_total"),
        dead_lettered=total("ingest_messages_dead_lettered_total"),
        db_retries=total("ingest_db_retries_total"),
        consumer_restarts=total("ingest_consumer_restarts_total"),
        queue_depth=total("ingest_queue_depth"),
        queue_capacity=total("ingest_queue_capacity"),
        pool_size=total("ingest_db_pool_size"),
        pool_in_use=total("ingest_db_pool_in_use"),
        pool_waiting=total("ingest_db_pool_waiting"),
        consumers_alive=total("ingest_consumers_alive"),
        consumers_configured=total("ingest_consumers_configured"),
        thread_errors=per_label("ingest_thread_errors_total", "thread"),
        rejected=per_label("ingest_messages_rejected_total", "reason"),
        http_responses=per_label("ingest_http_requests_total", "code"),
        latency=histogram("ingest_message_latency_seconds"),
        db_write=histogram("ingest_db_write_seconds"),
        batch_size=histogram("ingest_batch_size"),
    )


def fetch(metrics_url: str, timeout_s: float, token: str | None = None, cacert: str | None = None) -> Snapshot:
    """One scrape; every way it can fail becomes a ClientError with the URL in it."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        context = ssl.create_default_context(cafile=cacert) if cacert is not None else None
        scrape = urllib.request.Request(metrics_url, headers=headers)
        with urllib.request.urlopen(scrape, timeout=timeout_s, context=context) as response:
            body = response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        raise ClientError(f"cannot reach {metrics_url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise ClientError(f"cannot reach {metrics_url}: {exc.reason}") from None
    except (OSError, ValueError) as exc:  # timeouts, resets mid-body, a malformed URL
        raise ClientError(f"cannot reach {metrics_url}: {exc}") from None
    try:
        return parse_snapshot(body)
    except ValueError as exc:
        raise ClientError(f"{metrics_url} does not answer in Prometheus text format: {exc}") from None
