"""`ingest top`: a live terminal view of a running service, read from its /metrics.

Client side only, like `push`: it imports nothing from the server modules, so it watches any
ingest it can reach over HTTP. Rates need two scrapes, so `--once` also scrapes twice,
`interval_s` apart, and prints the second scrape with the rates between the two.
"""

from __future__ import annotations

import math
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ingest.errors import ClientError

EXIT_OK = 0
CLEAR_SCREEN = "\x1b[H\x1b[2J"
BAR_WIDTH = 40
QUANTILES = (0.5, 0.95, 0.99)
# Shown in this order (with 0 when absent) so the line does not jump as reasons appear.
REJECT_REASONS = ("invalid", "too_large", "unsupported", "queue_full", "shutting_down")


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


def render(snapshot: Snapshot, previous: Snapshot | None, elapsed_s: float) -> str:
    """The screen for one scrape; rates and recent percentiles come from `previous`, if any."""
    # An empty Snapshot has every figure None, which renders rates as n/a.
    s, p = snapshot, previous or Snapshot()
    lines = [
        _row(
            "throughput",
            f"in {_rate(s.received, p.received, elapsed_s)}",
            f"stored {_rate(s.stored, p.stored, elapsed_s)}",
            f"dead-lettered {_rate(s.dead_lettered, p.dead_lettered, elapsed_s)}",
        ),
        _row(
            "totals",
            f"received {_count(s.received)}",
            f"stored {_count(s.stored)}",
            f"dead-lettered {_count(s.dead_lettered)}",
        ),
        _row("queue", _queue_bar(s.queue_depth, s.queue_capacity)),
        _row("latency", *_percentiles(s.latency, p.latency, elapsed_s)),
        _row("db write", *_percentiles(s.db_write, p.db_write, elapsed_s)),
        _row("batch size", _batch_mean(s.batch_size, p.batch_size)),
        _row(
            "pool",
            f"in use {_count(s.pool_in_use)} / {_count(s.pool_size)}",
            f"waiting {_count(s.pool_waiting)}",
        ),
        _row(
            "consumers",
            f"alive {_count(s.consumers_alive)} / {_count(s.consumers_configured)}",
            f"restarts {_count(s.consumer_restarts)}",
        ),
        _row(
            "errors",
            f"thread errors {_count(sum(s.thread_errors.values()))}{_failing(s.thread_errors)}",
            f"db retries {_count(s.db_retries)}",
            f"dead letters {_count(s.dead_lettered)}",
        ),
        _row("rejected", *(f"{r} {_count(n)}" for r, n in _ordered(s.rejected, REJECT_REASONS))),
        _row("http", *(f"{code} {_count(n)}" for code, n in sorted(s.http_responses.items()) if n)),
    ]
    return "\n".join(lines) + "\n"


def run(
    *,
    url: str,
    once: bool,
    interval_s: float = 1.0,
    out: TextIO,
    stop: threading.Event | None = None,
    token: str | None = None,
    cacert: str | None = None,
) -> int:
    """Show the service at `url` until Ctrl-C (or `stop` is set); with `once`, one screen.

    Raises ClientError when the first scrape fails. After that, a failed scrape keeps the last
    screen with a warning and tries again next interval: a restarting service comes back.
    """
    metrics_url = _metrics_url(url)
    stop = stop or threading.Event()
    timeout_s = max(1.0, min(interval_s, 5.0))
    tty = out.isatty()
    try:
        current, current_at = fetch(metrics_url, timeout_s, token, cacert), time.monotonic()
        previous: Snapshot | None = None
        previous_at = current_at
        if once:
            if stop.wait(interval_s):
                return EXIT_OK
            previous, previous_at = current, current_at
            current, current_at = fetch(metrics_url, timeout_s, token, cacert), time.monotonic()
            out.write(_header(metrics_url, None) + render(current, previous, current_at - previous_at))
            out.flush()
            return EXIT_OK
        warning = ""
        while True:
            screen = _header(metrics_url, interval_s) + warning
            screen += render(current, previous, current_at - previous_at)
            out.write((CLEAR_SCREEN if tty else "\n") + screen)
            out.flush()
            if stop.wait(interval_s):
                return EXIT_OK
            try:
                latest, latest_at = fetch(metrics_url, timeout_s, token, cacert), time.monotonic()
            except ClientError as exc:
                warning = f"!! {exc} (retrying)\n"
                continue
            warning = ""
            previous, previous_at = current, current_at
            current, current_at = latest, latest_at
    except KeyboardInterrupt:
        out.write("\ningest top: stopped.\n")
        out.flush()
        return EXIT_OK


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


def _metrics_url(url: str) -> str:
    base = url if "://" in url else f"http://{url}"
    base = base.rstrip("/")
    return base if base.endswith("/metrics") else f"{base}/metrics"


def _header(metrics_url: str, interval_s: float | None) -> str:
    when = datetime.now().strftime("%H:%M:%S")
    every = f"every {interval_s:g}s, Ctrl-C to quit" if interval_s is not None else "one snapshot"
    return f"ingest top  {metrics_url}  {when}  ({every})\n\n"


def _row(label: str, *cells: str) -> str:
    return f"{label:<11} " + "   ".join(cells) if cells else f"{label:<11} -"


def _count(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _rate(now: float | None, before: float | None, elapsed_s: float) -> str:
    # A counter that went down means the service restarted between scrapes: no honest rate.
    if now is None or before is None or elapsed_s <= 0 or now < before:
        return "n/a"
    return f"{(now - before) / elapsed_s:,.1f}/s"


def _queue_bar(depth: float | None, capacity: float | None) -> str:
    if depth is None or not capacity:
        return f"depth {_count(depth)} / {_count(capacity)}"
    share = max(0.0, min(depth / capacity, 1.0))
    filled = round(share * BAR_WIDTH)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    return f"[{bar}] {_count(depth)} / {_count(capacity)} ({depth / capacity:.0%})"


def _percentiles(hist: Histogram | None, before: Histogram | None, elapsed_s: float) -> list[str]:
    if hist is None:
        return ["n/a"]
    # Prefer the last interval (what is happening now); fall back to the whole life of the service.
    window, scope = hist, "since start"
    if before is not None and hist.count > before.count:
        window, scope = hist.since(before), f"last {elapsed_s:.1f}s"
    if window.count <= 0:
        return ["n/a (nothing observed yet)"]
    cells = [f"p{round(q * 100)} {_duration(window.quantile(q))}" for q in QUANTILES]
    return [*cells, f"({scope})"]


def _batch_mean(hist: Histogram | None, before: Histogram | None) -> str:
    if hist is None:
        return "n/a"
    window = hist.since(before) if before is not None and hist.count > before.count else hist
    if window.count <= 0:
        return "n/a (no batch yet)"
    return f"mean {window.sum / window.count:,.1f} messages per batch"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _failing(errors: Mapping[str, float]) -> str:
    named = [f"{thread}: {n:,.0f}" for thread, n in sorted(errors.items()) if n]
    return f" ({', '.join(named)})" if named else ""


def _ordered(values: Mapping[str, float], known: tuple[str, ...]) -> list[tuple[str, float]]:
    first = [(name, values.get(name, 0.0)) for name in known]
    rest = sorted((name, n) for name, n in values.items() if name not in known)
    return first + rest
