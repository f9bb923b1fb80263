"""The pure parts of `ingest push`: options, schedule, bodies, errors, summary and progress bar.

Runs against a live service belong with the service fixtures; the only I/O here is a refused
connection on loopback and an empty run, neither of which needs a server.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import math
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from ingest.errors import ClientError, ConfigError
from ingest.tools import push, report

NOW = datetime(2024, 5, 17, 12, 30, 45, 123000, tzinfo=UTC)


def options(**overrides: Any) -> push.PushOptions:
    fields: dict[str, Any] = {"url": "http://127.0.0.1:8080", "count": 10, **overrides}
    return push.PushOptions(**fields)


# --- options -------------------------------------------------------------------------------------


def test_defaults_are_valid() -> None:
    o = options()
    assert (o.batch, o.concurrency, o.rate, o.burst, o.ack) == (100, 16, None, 0, "enqueue")
    assert (o.request_timeout_s, o.max_attempts, o.gzip) == (60.0, 50, False)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"count": -1}, "count"),
        ({"batch": 0}, "batch"),
        ({"concurrency": 0}, "concurrency"),
        ({"rate": 0.0}, "rate"),
        ({"rate": -5.0}, "rate"),
        ({"rate": math.nan}, "rate"),
        ({"rate": math.inf}, "rate"),
        ({"burst": -1}, "burst"),
        ({"ack": "flush"}, "ack"),
        ({"request_timeout_s": 0.0}, "request_timeout_s"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"url": "127.0.0.1:8080"}, "url"),
    ],
)
def test_invalid_options_raise_one_line_config_error(
    overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        options(**overrides)
    message = str(caught.value)
    assert field in message
    assert "\n" not in message


def test_replace_validates_too() -> None:
    with pytest.raises(ConfigError):
        dataclasses.replace(options(), batch=0)


def test_edge_values_are_accepted() -> None:
    options(count=0, batch=1, concurrency=1, rate=0.001, burst=0, ack="commit", max_attempts=1)
    options(url="https://ingest.example/", burst=500)


# --- percentile ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "expected"), [(5, 15), (30, 20), (40, 20), (50, 35), (99, 50), (100, 50)]
)
def test_percentile_is_nearest_rank(p: float, expected: float) -> None:
    # The worked example from the nearest-rank definition, given out of order.
    assert report.percentile([35, 20, 50, 15, 40], p) == expected


def test_percentile_of_one_value() -> None:
    assert report.percentile([0.25], 50) == report.percentile([0.25], 99) == 0.25


def test_percentile_of_a_hundred_values() -> None:
    values = [float(n) for n in range(1, 101)]
    assert [report.percentile(values, p) for p in (50, 95, 99)] == [50.0, 95.0, 99.0]


@pytest.mark.parametrize(("values", "p"), [([], 50), ([1.0], 0), ([1.0], 101)])
def test_percentile_rejects_what_has_no_answer(values: list[float], p: float) -> None:
    with pytest.raises(ValueError):
        report.percentile(values, p)


# --- summary -------------------------------------------------------------------------------------


def summary(**fields: Any) -> report.PushSummary:
    base: dict[str, Any] = {
        "count": 1000,
        "sent": 1000,
        "acknowledged": 1000,
        "retried": 3,
        "failed": 0,
        "elapsed_s": 2.0,
        "latencies_s": [0.010] * 8 + [0.050, 0.200],
    }
    return report.PushSummary(**{**base, **fields})


def test_summary_ok_only_when_everything_was_acknowledged() -> None:
    assert summary().ok
    assert report.PushSummary(count=0).ok
    assert not summary(acknowledged=900, failed=100).ok
    assert not summary(sent=900, acknowledged=900).ok
    assert not summary(failed=1).ok


def test_summary_format_reports_counts_rate_and_percentiles() -> None:
    text = summary().format()
    lines = text.splitlines()
    assert lines[0].split() == ["sent", "1000", "of", "1000", "messages"]
    assert "acknowledged  1000" in text
    assert "retried       3 " in text
    assert "failed        0 " in text
    assert "500.0 messages/s" in text
    assert "p50 10.0 ms" in text
    assert "p95 200.0 ms" in text
    assert "p99 200.0 ms" in text
    assert not any(line.startswith("error") for line in lines)


def test_summary_format_shows_distinct_errors_and_what_was_not_sent() -> None:
    errors = {f'HTTP 400: {{"error":"e{n}"}}': n + 1 for n in range(5)}
    text = summary(sent=800, acknowledged=600, failed=200, errors=errors).format()
    assert "(200 not sent)" in text
    assert 'error         HTTP 400: {"error":"e0"} (1 requests)' in text
    assert '"e2"' in text and '"e3"' not in text
    assert "and 2 more distinct errors" in text


def test_summary_format_without_latencies_or_time() -> None:
    text = report.PushSummary(count=5, sent=5, failed=5).format()
    assert "no request acknowledged" in text
    assert "0.0 messages/s" in text


# --- bodies --------------------------------------------------------------------------------------


def test_ndjson_body_has_one_parseable_message_per_line() -> None:
    body = push.encode_body(200, 100, ndjson=True, gzip=False, now=NOW)
    assert body.endswith(b"\n")
    messages = [json.loads(line) for line in body.decode().splitlines()]
    assert [m["seq"] for m in messages] == list(range(200, 300))
    first = messages[0]
    assert set(first) == {"sensor", "seq", "v", "ts"}
    assert first["sensor"] == f"s-{200 % 16}"
    assert isinstance(first["v"], float)
    assert datetime.fromisoformat(first["ts"]) == NOW


def test_consecutive_bodies_never_repeat_a_seq() -> None:
    seqs = [
        json.loads(line)["seq"]
        for first in range(0, 1050, 100)
        for line in push.encode_body(
            first, min(100, 1050 - first), ndjson=True, gzip=False, now=NOW
        ).splitlines()
    ]
    assert sorted(seqs) == list(range(1050))


def test_single_message_body_is_one_json_object() -> None:
    body = push.encode_body(7, 1, ndjson=False, gzip=False, now=NOW)
    message = json.loads(body)
    assert isinstance(message, dict)
    assert message["seq"] == 7 and message["sensor"] == "s-7"


def test_a_json_body_refuses_more_than_one_message() -> None:
    with pytest.raises(ValueError):
        push.encode_body(0, 2, ndjson=False, gzip=False, now=NOW)


def test_gzip_body_decompresses_to_the_plain_body() -> None:
    plain = push.encode_body(0, 50, ndjson=True, gzip=False, now=NOW)
    assert gzip.decompress(push.encode_body(0, 50, ndjson=True, gzip=True, now=NOW)) == plain


def test_value_depends_only_on_seq() -> None:
    later = datetime(2030, 1, 1, tzinfo=UTC)
    assert push.make_message(42, NOW)["v"] == push.make_message(42, later)["v"]


@pytest.mark.parametrize(
    ("ndjson", "gzip_", "expected"),
    [
        (True, False, {"Content-Type": "application/x-ndjson"}),
        (False, False, {"Content-Type": "application/json"}),
        (True, True, {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"}),
    ],
)
def test_request_headers(ndjson: bool, gzip_: bool, expected: dict[str, str]) -> None:
    assert push.request_headers(ndjson=ndjson, gzip=gzip_) == expected


@pytest.mark.parametrize(
    ("url", "ack", "expected"),
    [
        ("http://127.0.0.1:8080", "enqueue", "http://127.0.0.1:8080/messages"),
        ("http://127.0.0.1:8080/", "commit", "http://127.0.0.1:8080/messages?ack=commit"),
    ],
)
def test_messages_url(url: str, ack: str, expected: str) -> None:
    assert push.messages_url(url, ack) == expected


# --- pacing schedule -----------------------------------------------------------------------------


def test_no_pacing_sends_everything_at_once() -> None:
    assert {push.due_s(n, rate=None, burst=0) for n in range(1000)} == {0.0}


def test_rate_spreads_messages_evenly() -> None:
    assert [push.due_s(n, rate=4.0, burst=0) for n in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_bursts_only_release_whole_bursts_each_interval() -> None:
    due = [push.due_s(n, rate=None, burst=3) for n in range(7)]
    assert due == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0]
    assert push.due_s(7, rate=None, burst=3, interval_s=0.5) == 1.0


def test_rate_and_bursts_merge() -> None:
    # 10/s steady (t = 0, 0.1, ...) plus 5 at each whole second: 6 at t=0, then one each 0.1 s,
    # then at t=1 the steady one and 5 more.
    due = [push.due_s(n, rate=10.0, burst=5) for n in range(22)]
    assert due[:6] == [0.0] * 6
    assert due[6:15] == pytest.approx([0.1 * k for k in range(1, 10)])
    assert due[15:21] == [1.0] * 6
    assert due[21] == pytest.approx(1.1)


@pytest.mark.parametrize(("rate", "burst"), [(7.0, 0), (None, 13), (7.0, 13), (1000.0, 250)])
def test_schedule_is_monotonic_and_keeps_the_promised_volume(
    rate: float | None, burst: int
) -> None:
    due = [push.due_s(n, rate=rate, burst=burst) for n in range(5000)]
    assert due == sorted(due)
    # By the end of second T (just before the next burst), rate*T + 1 steady messages and
    # (T + 1) bursts are due.
    for t in (1, 2, 3):
        by_t = sum(1 for d in due if d <= t + 1e-9)
        expected = (math.floor((rate or 0) * t) + 1 if rate else 0) + burst * (t + 1)
        assert by_t == min(expected, len(due))


# --- retries and errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, 1.0),
        ("0", 0.0),
        ("2.5", 2.5),
        ("7", 7.0),
        ("3600", 30.0),
        ("-4", 0.0),
        ("soon", 1.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 1.0),
        ("nan", 1.0),
    ],
)
def test_retry_after(header: str | None, expected: float) -> None:
    assert push.retry_after_s(header) == expected


def test_backoff_grows_is_capped_and_jittered() -> None:
    plain = [push.backoff_s(attempt, 1.0) for attempt in range(1, 12)]
    assert plain[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert plain == sorted(plain)
    assert max(plain) == push.BACKOFF_CAP_S
    assert push.backoff_s(3, 0.0) == pytest.approx(0.2)


def test_describe_response_compacts_json_errors() -> None:
    body = b'{\n  "error": "invalid",\n  "detail": "line 3: not an object"\n}'
    assert push.describe_response(400, body) == (
        'HTTP 400: {"error":"invalid","detail":"line 3: not an object"}'
    )


def test_describe_response_keeps_text_on_one_short_line() -> None:
    assert push.describe_response(500, b"500 Internal\n\nServer Error") == (
        "HTTP 500: 500 Internal Server Error"
    )
    assert push.describe_response(413, b"") == "HTTP 413"
    long = push.describe_response(400, b"x" * 1000)
    assert len(long) < 250 and long.endswith("…")


# --- progress bar --------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def bar() -> Iterator[tuple[report.ProgressBar, io.StringIO, FakeClock]]:
    stream, clock = io.StringIO(), FakeClock()
    yield report.ProgressBar(stream, clock=clock), stream, clock


def test_progress_bar_redraws_one_line_at_most_ten_times_a_second(
    bar: tuple[report.ProgressBar, io.StringIO, FakeClock],
) -> None:
    progress, stream, clock = bar
    progress(0, 1000)
    clock.now_s += 0.04
    progress(100, 1000)  # too soon: skipped
    clock.now_s += 0.16
    progress(200, 1000)
    frames = stream.getvalue().split("\r")[1:]
    assert len(frames) == 2
    assert "\n" not in stream.getvalue()
    assert " 200/1000 " in frames[1] and "20%" in frames[1] and "1000 msg/s" in frames[1]


def test_progress_bar_ends_the_line_when_done(
    bar: tuple[report.ProgressBar, io.StringIO, FakeClock],
) -> None:
    progress, stream, _ = bar
    progress(0, 10)
    progress(10, 10)  # the last frame is never throttled
    progress.close()
    last = stream.getvalue().split("\r")[-1]
    assert "10/10" in last and "100%" in last and last.endswith("\n")
    assert stream.getvalue().count("\n") == 1


def test_progress_bar_close_ends_an_unfinished_line(
    bar: tuple[report.ProgressBar, io.StringIO, FakeClock],
) -> None:
    progress, stream, clock = bar
    progress(0, 10)
    clock.now_s += 1.0
    progress(4, 10)
    progress.close()
    assert stream.getvalue().endswith("\n")
    assert " 4/10" in stream.getvalue().split("\r")[-1]


def test_progress_bar_factory_returns_a_callback() -> None:
    stream = io.StringIO()
    report.progress_bar(stream)(0, 0)
    assert stream.getvalue().endswith("\n")


# --- runs that need no server --------------------------------------------------------------------


def test_pushing_nothing_is_ok() -> None:
    calls: list[tuple[int, int]] = []
    result = push.run(options(count=0), progress=lambda a, t: calls.append((a, t)))
    assert result.ok and result.sent == 0
    assert calls == [(0, 0)]


def test_unreachable_service_raises_client_error() -> None:
    # A bound socket that never listens refuses connections, and nobody else can take the port.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        with pytest.raises(
            ClientError, match=r"cannot reach http://127\.0\.0\.1:\d+: connection refused"
        ):
            push.run(options(url=f"http://127.0.0.1:{port}", max_attempts=1))


def test_fast_encoding_matches_make_message() -> None:
    from ingest.tools.push import encode_body, make_message

    now = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)
    lines = encode_body(0, 500, ndjson=True, gzip=False, now=now).decode().splitlines()
    assert [json.loads(line) for line in lines] == [make_message(seq, now) for seq in range(500)]
