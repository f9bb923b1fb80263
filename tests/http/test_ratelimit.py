"""Per-client rate limits: the bucket itself on a clock the test moves, then 429s over HTTP."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from ingest.errors import RateLimited
from ingest.http.ratelimit import RateLimiter
from ingest.tools.push import PushOptions, run
from support.fakeclock import Clock
from support.httpclient import request
from support.probes import metric


def test_a_bucket_refills_at_its_rate_and_says_how_long_to_wait() -> None:
    clock = Clock()
    limiter = RateLimiter(10, 20, clock=clock)
    limiter.take("a", 20)  # the whole burst at once
    with pytest.raises(RateLimited) as refused:
        limiter.take("a", 5)
    assert refused.value.retry_after_s == pytest.approx(0.5)
    limiter.take("b", 20)  # another client has its own bucket
    clock.now += 0.5
    limiter.take("a", 5)
    clock.now += 100
    limiter.take("a", 20)  # refilled, but never past the burst
    with pytest.raises(RateLimited):
        limiter.take("a", 1)


def test_a_request_larger_than_the_burst_passes_when_the_bucket_is_full_and_leaves_a_debt() -> None:
    clock = Clock()
    limiter = RateLimiter(10, 20, clock=clock)
    limiter.take("a", 50)
    with pytest.raises(RateLimited) as refused:
        limiter.take("a", 1)
    assert refused.value.retry_after_s == pytest.approx(3.1)  # 30 of debt, then 1 token, at 10/s


def test_the_table_of_clients_is_bounded() -> None:
    clock = Clock()
    limiter = RateLimiter(1, 1, max_clients=3, clock=clock)
    for n in range(10):
        limiter.take(f"client-{n}", 1)
        clock.now += 1  # the bucket is full again: it may be forgotten
    assert "3 client(s)" in repr(limiter)


def _post(url: str, count: int, token: str | None = None) -> tuple[int, dict[str, str]]:
    body = "".join(json.dumps({"n": n}) + "\n" for n in range(count)).encode()
    headers = {"Content-Type": "application/x-ndjson"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    reply = request(f"{url}/messages", "POST", body, headers)
    return reply.status, reply.headers


def test_over_the_limit_a_client_gets_429_with_retry_after(make_service) -> None:
    service = make_service(rate_limit=5, rate_burst=10)
    assert _post(service.url, 10)[0] == 202
    status, headers = _post(service.url, 5)
    assert status == 429
    assert 1 <= int(headers["retry-after"]) <= 2
    assert metric(service, "ingest_messages_rejected_total", {"reason": "rate_limited", "client": "anonymous"}) == 5


def test_with_tokens_each_client_has_its_own_limit(make_service, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:alice-token-0123456789\nbob:bob-token-0123456789xx\n")
    service = make_service(rate_limit=1, rate_burst=5, auth_tokens=str(tokens))
    assert _post(service.url, 5, "alice-token-0123456789")[0] == 202
    assert _post(service.url, 1, "alice-token-0123456789")[0] == 429
    assert _post(service.url, 5, "bob-token-0123456789xx")[0] == 202
    assert metric(service, "ingest_messages_rejected_total", {"reason": "rate_limited", "client": "alice"}) == 1


def test_push_waits_out_429s_and_everything_arrives(make_service) -> None:
    service = make_service(rate_limit=200, rate_burst=50)
    summary = run(PushOptions(url=service.url, count=400, batch=50, concurrency=2))
    assert summary.acknowledged == 400 and summary.retried > 0, summary.format()


def test_a_flooder_is_not_forgotten_however_many_addresses_come_after_it() -> None:
    clock = Clock()
    limiter = RateLimiter(1, 10, max_clients=100, clock=clock)
    limiter.take("flooder", 10)  # its bucket is empty now
    # Many more clients than the table holds (a sender with many source addresses), each
    # spending a little: none of their buckets is full, so none may push the flooder out.
    for n in range(300):
        with contextlib.suppress(RateLimited):
            limiter.take(f"10.0.{n // 256}.{n % 256}", 1)
    with pytest.raises(RateLimited):
        limiter.take("flooder", 1)
    assert "100 client(s)" in repr(limiter)


def test_with_every_bucket_in_debt_new_clients_share_one_bucket_and_full_ones_make_room() -> None:
    clock = Clock()
    limiter = RateLimiter(1, 10, max_clients=100, clock=clock)
    for n in range(100):
        limiter.take(f"client-{n}", 10)
    limiter.take("new-1", 10)  # the shared bucket, full once
    with pytest.raises(RateLimited):
        limiter.take("new-2", 1)  # shares it: not a full bucket of its own
    clock.now += 10  # every bucket in the table is full again: one may go
    limiter.take("new-2", 10)
    with pytest.raises(RateLimited):
        limiter.take("new-2", 1)  # it has a bucket of its own now, and spent it
    assert "100 client(s)" in repr(limiter)
