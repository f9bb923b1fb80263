"""Every input format and every error status, over real HTTP on loopback."""

import gzip
import logging
import socket
import sys

import pytest

from support.httpclient import post_json, post_ndjson, request
from support.probes import count_rows, metric
from support.waiting import wait_until


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_single_object_array_and_ndjson_are_stored(make_service, make_engine, sqlite_url, event_loop, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ingest.service")
    service = make_service(event_loop=event_loop)
    assert service.listener.event_loop == event_loop
    assert f"consumers, {event_loop} loop)" in caplog.text
    assert post_json(service.url, {"sensor": "a", "v": 1}).counts() == {"accepted": 1}
    reply = post_json(service.url, [{"n": 1}, {"n": 2}])
    assert (reply.status, reply.counts()) == (202, {"accepted": 2})
    reply = post_ndjson(service.url, [{"n": 3}, {"n": 4}, {"n": 5}])
    assert (reply.status, reply.counts()) == (202, {"accepted": 3})
    reply = post_json(service.url, [{"n": 6}], compress=True)
    assert (reply.status, reply.counts()) == (202, {"accepted": 1})
    engine = make_engine(sqlite_url)
    wait_until(lambda: count_rows(engine) == 7, what="7 rows stored")
    assert metric(service, "ingest_messages_received_total", {"client": "anonymous"}) == 7


@pytest.mark.parametrize(
    ("body", "headers", "status", "reason", "fragment"),
    [
        (b'{"a": ', {"Content-Type": "application/json"}, 400, "invalid", "malformed JSON"),
        (b'[{"a": 1}, 2]', {"Content-Type": "application/json"}, 400, "invalid", "index 1"),
        (b'{"a": 1}\n7\n', {"Content-Type": "application/x-ndjson"}, 400, "invalid", "line 2"),
        (b'{"a": 1}', {"Content-Type": "text/plain"}, 415, "unsupported", "text/plain"),
        (b'{"a": 1}', {"Content-Type": "application/json", "Content-Encoding": "br"}, 415, "unsupported", "br"),
        (b"x" * 2000, {"Content-Type": "application/json"}, 413, "too_large", "1000 bytes"),
        (gzip.compress(b" " * 5000, mtime=0), {"Content-Type": "application/json", "Content-Encoding": "gzip"},
         413, "too_large", "decompressed"),
    ],
)
def test_error_statuses(make_service, body, headers, status, reason, fragment) -> None:
    service = make_service(max_body_bytes=1000)
    reply = request(f"{service.url}/messages", "POST", body, headers)
    assert reply.status == status
    error = reply.json()
    assert fragment in error["error"] and "detail" in error
    assert metric(service, "ingest_messages_rejected_total", {"reason": reason, "client": "anonymous"}) == 1
    assert metric(service, "ingest_http_requests_total", {"code": str(status)}) == 1
    assert metric(service, "ingest_messages_received_total", {"client": "anonymous"}) == 0


def test_chunked_body_over_the_limit_is_413(make_service) -> None:
    service = make_service(max_body_bytes=1000)

    def chunks():
        yield b"[" + b" " * 900
        yield b" " * 900 + b"]"

    # No Content-Length: http.client sends the generator chunked, so only the read can tell.
    reply = request(f"{service.url}/messages", "POST", chunks(), {"Content-Type": "application/json"})
    assert reply.status == 413
    assert reply.json()["detail"] == {"limit": 1000}


def test_chunked_body_over_the_limit_all_at_once_is_413(make_service) -> None:
    """The whole chunked body in one write: it is all in the buffer when the handler runs, which
    takes it without awaiting the read, so that path must check the length itself."""
    service = make_service(max_body_bytes=1000)
    body = b"[" + b" " * 1800 + b"]"
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"limit": 1000' in reply


def test_unknown_ack_and_route_are_json_errors(make_service) -> None:
    service = make_service()
    reply = post_json(service.url, {"a": 1}, query="?ack=later")
    assert reply.status == 400 and "ack must be" in reply.json()["error"]
    assert metric(service, "ingest_messages_rejected_total", {"reason": "invalid", "client": "anonymous"}) == 1
    reply = request(f"{service.url}/nowhere")
    assert reply.status == 404 and reply.json()["error"]


def test_ack_commit_returns_after_rows_exist(make_service, make_engine, sqlite_url) -> None:
    service = make_service(batch_linger_s=0.0)
    engine = make_engine(sqlite_url)
    for n in range(5):
        reply = post_ndjson(service.url, [{"n": n, "i": i} for i in range(3)], query="?ack=commit")
        assert (reply.status, reply.counts()) == (201, {"stored": 3, "duplicates": 0})
        assert count_rows(engine) == 3 * (n + 1)


def test_server_default_ack_commit(make_service, make_engine, sqlite_url) -> None:
    service = make_service(ack="commit")
    reply = post_json(service.url, {"a": 1})
    assert (reply.status, reply.counts()) == (201, {"stored": 1, "duplicates": 0})
    assert count_rows(make_engine(sqlite_url)) == 1
    assert post_json(service.url, {"a": 1}, query="?ack=enqueue").status == 202


def test_health_readiness_and_metrics_endpoints(make_service) -> None:
    service = make_service()
    assert request(f"{service.url}/healthz").json() == {"healthy": True}
    assert request(f"{service.url}/readyz").json() == {"ready": True}
    reply = request(f"{service.url}/metrics")
    assert reply.status == 200 and b"ingest_queue_capacity 10000.0" in reply.body


_PATHS_CASES = [
    (b'{"a": 1}', {"Content-Type": "application/json"}),
    (b'{"a": ', {"Content-Type": "application/json"}),
    (b'{"a": 1}', {"Content-Type": "text/plain"}),
    (b"x" * 2000, {"Content-Type": "application/json"}),
    (b'{"a": 1}', {"Content-Type": "application/json", "X-Request-Id": "same-id-1"}),
]


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_the_hot_path_and_the_routers_path_answer_alike(make_service, event_loop) -> None:
    """POST /messages skips aiohttp's router (routes.hot_path) unless the request has Expect;
    both ways must give the same reply, on either loop."""
    service = make_service(max_body_bytes=1000, event_loop=event_loop)
    for body, headers in _PATHS_CASES:
        hot = request(f"{service.url}/messages", "POST", body, headers)
        routed = request(f"{service.url}/messages", "POST", body, {**headers, "Expect": "100-continue"})
        assert (hot.status, hot.headers["content-type"]) == (routed.status, routed.headers["content-type"])
        hot_body, routed_body = hot.json(), routed.json()
        if hot.status == 202:
            assert hot_body.keys() == routed_body.keys() == {"accepted", "request"}
            assert "x-request-id" in hot.headers and "x-request-id" in routed.headers
            if "X-Request-Id" in headers:
                assert hot_body == routed_body
        else:
            assert hot_body == routed_body
    assert metric(service, "ingest_http_requests_total", {"code": "202"}) == 4
    assert metric(service, "ingest_http_requests_total", {"code": "400"}) == 2
    # Methods the hot path does not take still get the router's 405 with its Allow header.
    reply = request(f"{service.url}/messages", "GET")
    assert reply.status == 405 and "POST" in reply.headers["allow"] and reply.json()["error"]


def test_expect_100_continue_is_answered_before_the_body_is_sent(make_service) -> None:
    """curl sends `Expect: 100-continue` for bodies over 1 KiB and waits for it before sending
    them: the hot path must leave such requests to aiohttp, which answers it."""
    service = make_service()
    body = b'{"a": 1}'
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body))
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue")  # times out (fails) without it
        sock.sendall(body)
        reply = b""
        while b'"request"' not in reply:
            chunk = sock.recv(4096)
            assert chunk, reply
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 202")


def test_without_uvloop_serve_says_what_to_do(monkeypatch) -> None:
    """Where uvloop cannot be imported (it has no Windows build), the default loop is a one-line
    startup error that names the way out."""
    from ingest.errors import StartupError
    from ingest.http.listener import loop_factory

    monkeypatch.setitem(sys.modules, "uvloop", None)  # what import finds for a missing package
    with pytest.raises(StartupError, match="give --event-loop asyncio"):
        loop_factory("uvloop")
    loop = loop_factory("asyncio")()
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()
