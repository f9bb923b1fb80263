"""`ingest top`: pure parsing and rendering on text built here, the live loop against a small
local exporter, and `ingest top --once` against a real `ingest serve`."""

from __future__ import annotations

import io
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ingest.errors import ClientError
from ingest.tools import top
from support.httpclient import request
from support.serving import serving
from support.stack_support import clean_env, free_port, ingest_command, metrics_text

HEALTHY = """\
# TYPE ingest_queue_depth gauge
ingest_queue_depth 2500.0
# TYPE ingest_queue_capacity gauge
ingest_queue_capacity 10000.0
# TYPE ingest_messages_received_total counter
ingest_messages_received_total 1000.0
# TYPE ingest_messages_stored_total counter
ingest_messages_stored_total 900.0
# TYPE ingest_messages_rejected_total counter
ingest_messages_rejected_total{reason="invalid"} 2.0
ingest_messages_rejected_total{reason="queue_full"} 7.0
# TYPE ingest_message_latency_seconds histogram
ingest_message_latency_seconds_bucket{le="0.01"} 100.0
ingest_message_latency_seconds_bucket{le="0.1"} 500.0
ingest_message_latency_seconds_bucket{le="1.0"} 900.0
ingest_message_latency_seconds_bucket{le="+Inf"} 900.0
ingest_message_latency_seconds_count 900.0
ingest_message_latency_seconds_sum 120.0
# TYPE ingest_batch_size histogram
ingest_batch_size_bucket{le="100.0"} 2.0
ingest_batch_size_bucket{le="500.0"} 3.0
ingest_batch_size_bucket{le="+Inf"} 3.0
ingest_batch_size_count 3.0
ingest_batch_size_sum 900.0
# TYPE ingest_db_pool_size gauge
ingest_db_pool_size 2.0
# TYPE ingest_db_pool_in_use gauge
ingest_db_pool_in_use 2.0
# TYPE ingest_db_pool_waiting gauge
ingest_db_pool_waiting 1.0
# TYPE ingest_consumers_alive gauge
ingest_consumers_alive 3.0
# TYPE ingest_consumers_configured gauge
ingest_consumers_configured 4.0
# TYPE ingest_thread_errors_total counter
ingest_thread_errors_total{thread="listener"} 0.0
ingest_thread_errors_total{thread="consumer-2"} 1.0
# TYPE ingest_db_retries_total counter
ingest_db_retries_total 5.0
# TYPE ingest_http_requests_total counter
ingest_http_requests_total{code="202"} 10.0
ingest_http_requests_total{code="400"} 0.0
"""


def _later(text: str, **changes: float) -> str:
    """The same exposition with some samples moved on, as a later scrape would show it."""
    for name, value in changes.items():
        text = re.sub(rf"^{re.escape(name)} .*$", f"{name} {value}", text, flags=re.MULTILINE)
    return text


# ---------------------------------------------------------------- parse_snapshot / render (pure)


def test_parse_snapshot_reads_every_figure() -> None:
    snap = top.parse_snapshot(HEALTHY)
    assert (snap.received, snap.stored, snap.queue_depth, snap.queue_capacity) == (1000, 900, 2500, 10000)
    assert (snap.pool_size, snap.pool_in_use, snap.pool_waiting) == (2, 2, 1)
    assert (snap.consumers_alive, snap.consumers_configured, snap.db_retries) == (3, 4, 5)
    assert snap.rejected == {"invalid": 2, "queue_full": 7}
    assert snap.thread_errors == {"listener": 0, "consumer-2": 1}
    assert snap.http_responses == {"202": 10, "400": 0}
    assert snap.latency is not None and snap.latency.count == 900
    assert snap.latency.buckets[-1] == (float("inf"), 900)
    assert snap.dead_lettered is None and snap.db_write is None


def test_parse_snapshot_refuses_what_is_not_prometheus_text() -> None:
    with pytest.raises(ValueError):
        top.parse_snapshot("<html>this is a login page</html>\n")


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (0.05, 0.0045),  # rank 45 of 900, first bucket: 0 + 0.01 * 45/100
        (0.5, 0.08875),  # rank 450: 0.01 + 0.09 * (450-100)/400
        (0.99, 0.97975),  # rank 891: 0.1 + 0.9 * (891-500)/400
    ],
)
def test_quantile_interpolates_like_histogram_quantile(q: float, expected: float) -> None:
    snap = top.parse_snapshot(HEALTHY)
    assert snap.latency is not None
    assert snap.latency.quantile(q) == pytest.approx(expected)


def test_quantile_in_the_inf_bucket_reports_the_largest_finite_bound() -> None:
    hist = top.Histogram(buckets=((0.1, 1.0), (1.0, 2.0), (float("inf"), 10.0)), count=10, sum=99)
    assert hist.quantile(0.99) == 1.0
    assert top.Histogram(buckets=((1.0, 0.0), (float("inf"), 0.0)), count=0, sum=0).quantile(0.5) is None


def test_render_without_a_previous_scrape_has_no_rates_but_every_total() -> None:
    screen = top.render(top.parse_snapshot(HEALTHY), None, 0.0)
    assert "in n/a" in screen and "stored n/a" in screen
    assert "received 1,000" in screen and "stored 900" in screen
    assert "2,500 / 10,000 (25%)" in screen
    assert "[" + "#" * 10 + "." * 30 + "]" in screen
    assert "in use 2 / 2" in screen and "waiting 1" in screen
    assert "alive 3 / 4" in screen
    assert "thread errors 1 (consumer-2: 1)" in screen and "db retries 5" in screen
    assert "invalid 2   too_large 0   unsupported 0   queue_full 7   shutting_down 0" in screen
    assert "p50 88.8 ms" in screen and "(since start)" in screen
    assert "mean 300.0 messages per batch" in screen
    assert "202 10" in screen and "400" not in screen  # codes never answered are left out


def test_render_with_a_previous_scrape_shows_rates_and_recent_percentiles() -> None:
    before = top.parse_snapshot(HEALTHY)
    after = top.parse_snapshot(
        _later(
            HEALTHY,
            ingest_messages_received_total=3000,
            ingest_messages_stored_total=1900,
            **{
                'ingest_message_latency_seconds_bucket{le="0.01"}': 100,
                'ingest_message_latency_seconds_bucket{le="0.1"}': 500,
                'ingest_message_latency_seconds_bucket{le="1.0"}': 1900,
                'ingest_message_latency_seconds_bucket{le="+Inf"}': 1900,
                "ingest_message_latency_seconds_count": 1900,
            },
        )
    )
    screen = top.render(after, before, 2.0)
    assert "in 1,000.0/s" in screen and "stored 500.0/s" in screen
    # The 1000 new observations all fell in (0.1, 1]: p50 is the middle of that bucket.
    assert "p50 550.0 ms" in screen and "(last 2.0s)" in screen


def test_a_counter_that_went_down_means_a_restart_and_shows_no_rate() -> None:
    before = top.parse_snapshot(HEALTHY)
    after = top.parse_snapshot(_later(HEALTHY, ingest_messages_received_total=10))
    assert "in n/a" in top.render(after, before, 1.0)


def test_render_says_n_a_for_metrics_the_service_does_not_export() -> None:
    screen = top.render(top.parse_snapshot("# TYPE other gauge\nother 1.0\n"), None, 0.0)
    assert "received n/a" in screen and "depth n/a / n/a" in screen and "latency     n/a" in screen


# ---------------------------------------------------------------- run() against a local exporter


class _Exporter:
    """A tiny /metrics server whose answers the test scripts: text, or an HTTP error code."""

    def __init__(self, answers: list[str | int]) -> None:
        self.answers = answers
        self.served = 0
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                answer = exporter.answers[min(exporter.served, len(exporter.answers) - 1)]
                exporter.served += 1
                if isinstance(answer, int):
                    self.send_error(answer)
                    return
                body = answer.encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain; version=0.0.4")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="exporter")


@pytest.fixture
def exporter_factory() -> Iterator[type[_Exporter]]:
    started: list[_Exporter] = []

    class Started(_Exporter):
        def __init__(self, answers: list[str | int]) -> None:
            super().__init__(answers)
            self.thread.start()
            started.append(self)

    yield Started
    for exporter in started:
        exporter.server.shutdown()
        exporter.server.server_close()
        exporter.thread.join(timeout=5)


class _Screen(io.StringIO):
    """Collects frames; sets `stop` after `frames` of them, like a user pressing a key."""

    def __init__(self, stop: threading.Event, frames: int, tty: bool = False) -> None:
        super().__init__()
        self.stop, self.frames, self.tty, self.writes = stop, frames, tty, 0

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.writes += 1
        if self.writes >= self.frames:
            self.stop.set()
        return super().write(text)


def test_once_scrapes_twice_and_prints_one_screen_with_rates(exporter_factory: type[_Exporter]) -> None:
    exporter = exporter_factory([HEALTHY, _later(HEALTHY, ingest_messages_received_total=1100)])
    out = io.StringIO()
    assert top.run(url=exporter.url, once=True, interval_s=0.05, out=out) == top.EXIT_OK
    screen = out.getvalue()
    assert exporter.served == 2
    assert screen.count("ingest top") == 1 and "/metrics" in screen
    assert re.search(r"in [\d,.]+/s", screen), screen
    assert "received 1,100" in screen


def test_live_view_refreshes_and_clears_the_screen_on_a_terminal(exporter_factory: type[_Exporter]) -> None:
    exporter = exporter_factory([HEALTHY])
    stop = threading.Event()
    out = _Screen(stop, frames=3, tty=True)
    assert top.run(url=exporter.url, once=False, interval_s=0.01, out=out, stop=stop) == top.EXIT_OK
    assert out.getvalue().count(top.CLEAR_SCREEN) == 3
    assert exporter.served >= 3


def test_live_view_without_a_terminal_writes_no_escape_codes(exporter_factory: type[_Exporter]) -> None:
    exporter = exporter_factory([HEALTHY])
    stop = threading.Event()
    out = _Screen(stop, frames=2)
    top.run(url=exporter.url, once=False, interval_s=0.01, out=out, stop=stop)
    assert "\x1b" not in out.getvalue()


def test_live_view_keeps_going_when_the_service_stops_answering(exporter_factory: type[_Exporter]) -> None:
    exporter = exporter_factory([HEALTHY, 503, HEALTHY])
    stop = threading.Event()
    out = _Screen(stop, frames=3)
    assert top.run(url=exporter.url, once=False, interval_s=0.01, out=out, stop=stop) == top.EXIT_OK
    frames = out.getvalue()
    assert f"!! cannot reach {exporter.url}/metrics: HTTP 503" in frames
    assert "(retrying)" in frames


def test_ctrl_c_returns_0_with_a_clean_message(exporter_factory: type[_Exporter]) -> None:
    exporter = exporter_factory([HEALTHY])

    class Interrupted(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.interrupted = False

        def write(self, text: str) -> int:
            if not self.interrupted:
                self.interrupted = True
                raise KeyboardInterrupt
            return super().write(text)

    out = Interrupted()
    assert top.run(url=exporter.url, once=False, interval_s=0.01, out=out) == 0
    assert out.getvalue() == "\ningest top: stopped.\n"


def test_an_unreachable_service_is_a_client_error_naming_the_url() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(ClientError, match=rf"^cannot reach http://127\.0\.0\.1:{port}/metrics: "):
        top.run(url=f"http://127.0.0.1:{port}", once=True, out=io.StringIO())


def test_a_page_that_is_not_metrics_is_a_client_error(exporter_factory: type[_Exporter]) -> None:
    exporter = exporter_factory(["<html>nope</html>\n"])
    with pytest.raises(ClientError, match="Prometheus text format"):
        top.run(url=exporter.url, once=True, interval_s=0.01, out=io.StringIO())


# ---------------------------------------------------------------- `ingest top --once` on a real service


def _figures(metrics_text: str) -> top.Snapshot:
    return top.parse_snapshot(metrics_text)


def test_top_once_prints_the_figures_metrics_shows(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'ingest.db'}"
    with serving(["--db", db_url, "--consumers", "2", "--queue-size", "500"]) as service:
        ndjson = "\n".join(json.dumps({"sensor": "a", "v": n}) for n in range(40)).encode()
        for query, body, content_type, status in [
            ("?ack=commit", ndjson, "application/x-ndjson", 201),
            ("?ack=commit", b'{"v": 1}', "application/json", 201),
            ("", b"{not json", "application/json", 400),
            ("", b"v=1", "text/plain", 415),
        ]:
            reply = request(f"{service.url}/messages{query}", "POST", body, {"Content-Type": content_type})
            assert reply.status == status

        done = subprocess.run(
            ingest_command("top", "--once", "--interval", "0.2", "--url", service.url),
            capture_output=True, text=True, timeout=30, env=clean_env(),
        )
        assert done.returncode == 0, done.stderr
        screen = done.stdout
        # Nothing moves once the acks are in, except the count of /metrics answers themselves.
        shown = _figures(metrics_text(service.url))

    assert shown.received == shown.stored == 41
    assert f"received {shown.received:,.0f}" in screen and f"stored {shown.stored:,.0f}" in screen
    assert f"{shown.queue_depth:,.0f} / {shown.queue_capacity:,.0f}" in screen
    assert shown.queue_capacity == 500
    assert f"in use {shown.pool_in_use:,.0f} / {shown.pool_size:,.0f}" in screen
    assert f"waiting {shown.pool_waiting:,.0f}" in screen
    assert f"alive {shown.consumers_alive:,.0f} / {shown.consumers_configured:,.0f}" in screen
    assert shown.consumers_alive == 2
    assert f"db retries {shown.db_retries:,.0f}" in screen
    for reason, count in shown.rejected.items():
        assert f"{reason} {count:,.0f}" in screen
    assert shown.rejected["invalid"] == 1 and shown.rejected["unsupported"] == 1
    for code in ("201", "400", "415"):
        assert f"{code} {shown.http_responses[code]:,.0f}" in screen
    assert "in 0.0/s" in screen  # two scrapes, nothing pushed between them


def test_top_once_on_a_dead_port_exits_1_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    done = subprocess.run(
        ingest_command("top", "--once", "--url", f"http://127.0.0.1:{port}"),
        capture_output=True, text=True, timeout=30, env=clean_env(),
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f"ingest: error: cannot reach http://127.0.0.1:{port}/metrics: ")
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr
