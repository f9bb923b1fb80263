"""Retry-After that means something: from the backlog and the recent store rate, 1-60 s."""

from __future__ import annotations

import json
import sqlite3

from ingest.pace import Throughput
from support.fakeclock import Clock
from support.httpclient import request
from support.waiting import wait_until


def test_the_wait_is_the_backlog_at_the_recent_rate_and_grows_when_nothing_is_stored() -> None:
    clock = Clock()
    pace = Throughput(window_s=10, clock=clock)
    assert pace.retry_after_s(10_000) == 1  # nothing known yet: the shortest wait
    pace.record(5_000)
    assert pace.retry_after_s(10_000) == 20  # 500 msg/s over the window
    assert pace.retry_after_s(100) == 1  # never under 1 s
    clock.now += 5
    pace.record(95_000)
    assert pace.retry_after_s(10_000) == 1  # a fast database: a short wait
    assert pace.retry_after_s(10_000_000) == 60  # never over 60 s
    clock.now += 11
    assert pace.rate() == 0
    assert pace.retry_after_s(10) == 60  # stalled: the longest wait


def test_records_are_bounded_by_the_window_when_nobody_asks_for_the_rate() -> None:
    """A service that never refuses never asks for the rate; its records must not pile up (a
    60 million message soak grew 8 MiB from one record a batch before they were trimmed)."""
    clock = Clock()
    pace = Throughput(window_s=10, clock=clock)
    for _ in range(100_000):  # 1,000 s of commits, 100 a second
        pace.record(1_000)
        clock.now += 0.01
    assert len(pace) <= 1_001
    assert pace.rate() == 100_000  # the window's figure is unchanged by the trimming


def _post(url: str, count: int) -> tuple[int, str | None]:
    body = "".join(json.dumps({"n": n}) + "\n" for n in range(count)).encode()
    reply = request(f"{url}/messages", "POST", body, {"Content-Type": "application/x-ndjson"})
    return reply.status, reply.headers.get("retry-after")


def test_a_stalled_database_makes_retry_after_grow(make_service, sqlite_url) -> None:
    service = make_service(queue_size=100, consumers=1, enqueue_timeout_s=0.05)
    service.throughput.window_s = 2.0  # a short window, so the test need not wait ten seconds
    assert _post(service.url, 100)[0] == 202
    wait_until(service.throughput.rate, 10, "a first commit")
    lock = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        seen: list[int] = []

        def refused_with(wanted: int) -> bool:
            status, retry_after = _post(service.url, 60)
            if status == 503 and retry_after is not None:
                seen.append(int(retry_after))
            return bool(seen) and seen[-1] == wanted

        wait_until(lambda: refused_with(60), 30, "Retry-After: 60 once nothing has been stored for a window")
        assert seen[0] <= 2, f"right after commits the wait should be short: {seen}"
    finally:
        lock.execute("ROLLBACK")
        lock.close()
