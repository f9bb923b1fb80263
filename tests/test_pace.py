"""Retry-After that means something: room for the refused clients at the recent store rate, 1-60 s."""

from __future__ import annotations

import json
import sqlite3

from ingest.pace import Throughput
from support.fakeclock import Clock
from support.httpclient import request
from support.waiting import wait_until


def _pace(clock: Clock, jitter: float = 0.5) -> Throughput:
    """jitter 0.5 is the middle of the spread: the computed wait itself."""
    return Throughput(window_s=10, clock=clock, jitter=lambda: jitter)


def test_the_wait_is_the_clients_messages_and_those_refused_in_the_last_second_at_the_store_rate() -> None:
    clock = Clock()
    pace = _pace(clock)
    pace.record(100_000)  # 10,000 msg/s over the window
    waits = [pace.retry_after_s(1_000) for _ in range(64)]  # 64 clients refused within a second
    assert waits[0] == 1  # room for one request of 1,000 in 0.1 s: never under 1 s
    assert waits[19] == 2.0  # its 1,000 and the 19,000 refused before it
    assert waits[63] == 6.4  # its 1,000 and the 63,000 refused before it
    clock.now += 1.5  # those refusals are more than a second old: not ahead of the next client
    assert pace.retry_after_s(20_000) == 2.0


def test_the_wait_does_not_grow_with_the_backlog() -> None:
    """The old wait was the whole backlog at the store rate: 27 s for a burst's clients, who came
    back to an idle service. A client's wait now depends only on the demand at the door."""
    clock = Clock()
    pace = _pace(clock)
    pace.record(200_000)  # 20,000 msg/s, while half a million wait in the spool
    assert pace.retry_after_s(1_000) == 1


def test_the_wait_is_spread_by_jitter_around_the_computed_one() -> None:
    clock = Clock()
    for jitter, expected in ((0.0, 2.5), (0.5, 5.0), (0.999, 7.49)):
        pace = _pace(clock, jitter)
        pace.record(10_000)  # 1,000 msg/s
        assert abs(pace.retry_after_s(5_000) - expected) < 0.01, jitter
    pace = Throughput(window_s=10, clock=clock)  # the real jitter: refusals together, waits apart
    pace.record(10_000)
    waits = [pace.retry_after_s(5_000) for _ in range(20)]
    clock.now += 2
    assert len({round(w, 3) for w in waits}) > 10, waits


def test_the_wait_is_bounded_1_to_60_s_and_longest_when_nothing_is_stored() -> None:
    clock = Clock()
    pace = _pace(clock)
    assert pace.retry_after_s(10_000) == 1  # nothing known yet: the shortest wait
    pace.record(1_000)  # 100 msg/s
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
