"""Slow and idle clients cannot hold the listener: real sockets, as an attacker would open them."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import threading
from collections.abc import Iterator

import pytest

from ingest.http.guard import MAX_REFUSING
from support.httpclient import Reply, post_json, request
from support.probes import metric
from support.serving import serving
from support.waiting import wait_until


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setblocking(False)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def test_clients_sending_headers_a_byte_at_a_time_are_closed_and_others_go_on(make_service) -> None:
    service = make_service(header_timeout_s=1.0)
    head = b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sockets = [_connect(service.port) for _ in range(200)]
    stop = threading.Event()

    def trickle() -> None:
        sent = 0
        while not stop.is_set() and sent < len(head):
            for sock in sockets:
                with contextlib.suppress(OSError):  # closed by the server: that is the point
                    sock.send(head[sent : sent + 1])
            sent += 1
            stop.wait(0.2)  # the attacker's pace, not a synchronisation

    trickler = threading.Thread(target=trickle, name="slowloris")
    trickler.start()
    try:
        # Normal clients are served while the slow ones hold their connections.
        assert post_json(service.url, {"normal": 1}).status == 202
        wait_until(lambda: all(_closed_by_server(s) for s in sockets), 20, "every slow connection closed")
    finally:
        stop.set()
        trickler.join(10)
        for sock in sockets:
            sock.close()
    assert metric(service, "ingest_http_connections_closed_total", {"reason": "header_timeout"}) >= 200
    assert post_json(service.url, {"normal": 2}).status == 202
    wait_until(lambda: metric(service, "ingest_http_connections") <= 1, 10, "the slow connections gone")


def test_a_body_that_never_comes_gets_408_and_the_connection_closes(make_service) -> None:
    service = make_service(body_timeout_s=1.0)
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"a\":")
        reply = sock.recv(65536)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"Connection: close" in head, reply
        assert json.loads(body)["error"] == "the body did not arrive within 1 s"
        sock.setblocking(False)
        wait_until(lambda: _closed_by_server(sock), 10, "the connection closed after the 408")
    assert metric(service, "ingest_messages_rejected_total", {"reason": "timeout", "client": "anonymous"}) == 1


def test_past_max_connections_new_ones_are_closed_at_once(make_service) -> None:
    service = make_service(max_connections=20, header_timeout_s=60.0)
    held = [_connect(service.port) for _ in range(20)]
    wait_until(lambda: metric(service, "ingest_http_connections") == 20, 10, "20 connections held")
    extra = [_connect(service.port) for _ in range(10)]
    try:
        wait_until(lambda: all(_closed_by_server(s) for s in extra), 10, "the 10 extra connections closed")
        assert not any(_closed_by_server(s) for s in held)
        assert metric(service, "ingest_http_connections_closed_total", {"reason": "too_many"}) == 10
    finally:
        for sock in held + extra:
            sock.close()
    wait_until(lambda: metric(service, "ingest_http_connections") == 0, 10, "the held ones released")
    assert post_json(service.url, {"after": 1}).status == 202


def test_an_idle_keep_alive_connection_is_closed(make_service) -> None:
    service = make_service(keepalive_timeout_s=1.0)
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    sock.setblocking(False)
    wait_until(lambda: _closed_by_server(sock), 10, "the idle connection closed")
    sock.close()


def _raw_reply(port: int, data: bytes) -> tuple[bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < _length(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return head, body


def _length(reply: bytes) -> int:
    for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_errors_aiohttps_parser_writes_are_json_too(make_service) -> None:
    service = make_service()
    start = b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
    cases = {
        "a header over 8190 bytes": start + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n",
        "too many headers": start + b"".join(b"X-%d: 1\r\n" % n for n in range(200)) + b"\r\n",
        "a bad chunk size": start + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        "Content-Length with chunked": start + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    }
    for case, data in cases.items():
        head, body = _raw_reply(service.port, data)
        assert head[:12] in (b"HTTP/1.1 400", b"HTTP/1.0 400"), (case, head)
        assert b"Content-Type: application/json" in head, (case, head)
        reply = json.loads(body)
        assert reply["error"] and reply["detail"] is None, (case, reply)


# ---------------------------------------------------------------- over the cap: told 503, not dropped


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """Room for thousands of sockets in this process (the service's and the test's ends)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 16384)
    if wanted < 8192:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard}: this test needs 8192 descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _refused(reply: Reply, retry_after: int) -> bool:
    assert reply.status == 503, (reply.status, reply.body)
    assert reply.headers["retry-after"] == str(retry_after)
    assert reply.headers["connection"] == "close"
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json()["error"].startswith("too many connections"), reply.body
    return True


def test_over_the_cap_1500_idle_connections_leave_others_a_503_then_a_202(make_service, many_descriptors) -> None:
    service = make_service(max_connections=1500, header_timeout_s=8.0)
    idle = [_connect(service.port) for _ in range(1500)]
    try:
        wait_until(lambda: metric(service, "ingest_http_connections") == 1500, 20, "1500 idle connections held")
        for n in range(20):  # Retry-After: the header timeout plus its sweep
            assert _refused(post_json(service.url, {"while_held": n}), retry_after=9)
        assert metric(service, "ingest_http_connections_refused_total") == 20
        assert not any(_closed_by_server(s) for s in idle), "an answer over the cap took a held place"
        # The header timeout frees the places; the same clients are then served.
        wait_until(lambda: post_json(service.url, {"after": 1}).status == 202, 30, "a 202 once the idle ones go")
        wait_until(
            lambda: metric(service, "ingest_http_connections_closed_total", {"reason": "header_timeout"}) >= 1500, 30,
            "every idle connection closed by the header timeout",
        )
    finally:
        for sock in idle:
            sock.close()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _scrape(url: str, name: str) -> float:
    text = request(f"{url}/metrics").body.decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(name))


def test_5000_attempts_over_the_cap_leave_descriptors_and_memory_bounded(tmp_path, many_descriptors) -> None:
    """A real `ingest serve`, its 50 places held: 5,000 more connections in waves of 500, half
    sending a request, half saying nothing. The service's descriptors never pass the cap plus
    the bound on answers in progress, and come back; its RSS does not grow with the attempts."""
    args = ["--db", f"sqlite:///{tmp_path / 'cap.db'}", "--max-connections", "50", "--header-timeout", "60"]
    with serving(args) as proc:
        pid, port = proc.process.pid, int(proc.url.rpartition(":")[2])
        held = [_connect(port) for _ in range(50)]
        turned_away = 0  # probes answered 503 or closed: the service counts them like the attempts

        def probe(body: dict[str, int]) -> int:
            """A POST's status; 0 when the service closed the connection."""
            nonlocal turned_away
            try:
                status = post_json(proc.url, body).status
            except OSError:
                status = 0
            turned_away += status != 202
            return status

        try:
            wait_until(lambda: probe({"probe": 1}) == 503, 20, "the 50 places held")
            fds_before, rss_before = _fds(pid), _rss_kib(pid)
            head = b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
            peak, answered = 0, 0
            for _wave in range(10):
                wave = []
                for n in range(500):
                    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                    if n % 2 == 0:
                        with contextlib.suppress(OSError):
                            sock.sendall(head)
                    wave.append(sock)
                    if n % 50 == 0:
                        peak = max(peak, _fds(pid))
                for n, sock in enumerate(wave):
                    if n % 2 == 0:
                        with contextlib.suppress(OSError):
                            answered += sock.recv(65536).startswith(b"HTTP/1.1 503")
                    sock.close()
            assert answered > 0
            assert peak <= fds_before + MAX_REFUSING + 16, (fds_before, peak)
            wait_until(lambda: _fds(pid) <= fds_before + 2, 20, "the service's descriptors back to before")
            rss_after = _rss_kib(pid)
            assert rss_after - rss_before < 20 * 1024, (rss_before, rss_after)
        finally:
            for sock in held:
                sock.close()
        # A busy machine may take a moment to free the places: this wait's 503s count too.
        wait_until(lambda: probe({"after": 1}) == 202, 20, "the places free again")
        refused = _scrape(proc.url, "ingest_http_connections_refused_total")
        closed = _scrape(proc.url, 'ingest_http_connections_closed_total{reason="too_many"}')
        assert refused >= answered
        assert refused + closed == 5000 + turned_away  # every attempt over the cap told or closed
