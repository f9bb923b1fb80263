"""What `ingest top` shows: one screen of text from two scrapes, pure formatting and no I/O.

Rates and recent percentiles are differences between the scrapes, so they are computed here,
where an absent figure or a restarted service can be shown as n/a instead of a wrong number.
"""

from __future__ import annotations

from collections.abc import Mapping

from ingest.tools.scrape import Histogram, Snapshot

BAR_WIDTH = 40
QUANTILES = (0.5, 0.95, 0.99)
# Shown in this order (with 0 when absent) so the line does not jump as reasons appear.
REJECT_REASONS = ("invalid", "too_large", "unsupported", "queue_full", "shutting_down")


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
