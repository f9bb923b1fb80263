"""Slow and idle clients cannot hold the listener: real sockets, as an attacker would open them."""

from __future__ import annotations

import contextlib
import json
import socket
import threading

from support.httpclient import post_json
from support.probes import metric
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
