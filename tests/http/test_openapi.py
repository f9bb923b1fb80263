"""The published API (service/ingest/http/openapi.json) against the real service: every route is in
it, every status it documents for POST /messages is produced, and Schemathesis, generating
requests from it, finds no 5xx and no reply that breaks it."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from ingest.config import Settings
from ingest.service import Service
from support.httpclient import request
from support.probes import metric
from support.waiting import wait_until

OPENAPI = Path(__file__).resolve().parents[2] / "service" / "ingest" / "http" / "openapi.json"
DOC = json.loads(OPENAPI.read_text())
TOKEN = "client-token-0123456789"


# With --buffer nats:// only: a writer's 404 and ack=commit's 504, produced by
# tests/stream/test_stream_service.py (a real NATS cluster).
STREAM_ONLY = {404, 504}

def test_the_document_is_served_and_is_the_shipped_file(make_service) -> None:
    service = make_service()
    reply = request(f"{service.url}/openapi.json")
    assert reply.status == 200 and reply.json() == DOC
    assert DOC["openapi"].startswith("3.1")


def test_every_route_of_the_app_is_documented_and_nothing_else(make_service) -> None:
    service = make_service()
    app = service.listener._app
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(method, path) for path, operations in DOC["paths"].items() for method in operations}
    assert routes == documented


def _raw(port: int, data: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        return int(sock.recv(65536).split(b" ", 2)[1])


def test_every_status_documented_for_post_messages_is_produced(make_service, postgres_url, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"client:{TOKEN}\n")
    service = make_service(db_url=postgres_url, auth_tokens=str(tokens), rate_limit=1000, rate_burst=500,
                           body_timeout_s=1.0, max_body_bytes=20_000, spool=str(tmp_path / "s.db"),
                           spool_max_bytes=10_000, drain_timeout_s=2.0)  # its drain cannot finish: don't wait 20 s
    auth = {"Authorization": f"Bearer {TOKEN}"}
    json_type = {"Content-Type": "application/json", **auth}

    def post(body: bytes, headers: dict[str, str], query: str = "") -> int:
        return request(f"{service.url}/messages{query}", "POST", body, headers).status

    seen = {
        post(b'{"a": 1}', json_type, "?ack=commit"),
        post(b'{"a": 1}', json_type),
        post(b"{", json_type),
        post(b'{"a": 1}', {"Content-Type": "application/json"}),
        post(b'{"a": "\\u0000"}', json_type, "?ack=commit"),  # JSONB refuses NUL: dead letter
        post(b"[" + b"{}," * 9000 + b"{}]", json_type),  # over max_body_bytes
        post(b"x", {"Content-Type": "text/plain", **auth}),
        post(b"[" + b'{"pad": "' + b"x" * 60 + b'"},' * 150 + b"{}]", json_type),  # over the spool
        _raw(service.port, b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 50\r\n\r\n{"),
    }
    for _ in range(20):  # past the burst of 500
        seen.add(post(b"[" + b"{}," * 99 + b"{}]", json_type))
    documented = {int(code) for code in DOC["paths"]["/messages"]["post"]["responses"]} - STREAM_ONLY
    assert seen == documented, f"documented but not produced: {documented - seen}; produced: {seen - documented}"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_every_status_documented_for_the_other_routes_is_produced(make_service, monkeypatch) -> None:
    token = "metrics-token-0123456789"
    service = make_service(consumers=1, metrics_token=token, batch_linger_s=0, max_connections=5)
    seen: dict[str, set[int]] = {path: set() for path in ("/healthz", "/readyz", "/metrics", "/openapi.json")}

    def get(path: str, headers: dict[str, str] | None = None) -> None:
        seen[path].add(request(f"{service.url}{path}", headers=headers).status)

    for path in seen:
        get(path, {"Authorization": f"Bearer {token}"})
    get("/metrics")  # 401 without the token
    service.store.database_error = "OperationalError: gone"  # what the probe sets when the database stops answering
    get("/readyz")
    monkeypatch.setattr(service.supervisor, "check", lambda: None)  # leave the dead consumer dead

    def die(batch: object) -> object:
        raise RuntimeError("injected: a consumer dies")

    monkeypatch.setattr(service.store, "write", die)
    assert request(f"{service.url}/messages", "POST", b'{"a": 1}', {"Content-Type": "application/json"}).status == 202
    wait_until(lambda: not service.health.healthy(), 10, "the consumer dead")
    get("/healthz")
    held = [socket.create_connection(("127.0.0.1", service.port), timeout=10) for _ in range(5)]
    try:  # over the connection cap, every route answers 503
        wait_until(lambda: metric(service, "ingest_http_connections") == 5, 10, "the cap reached")
        for path in seen:
            get(path, {"Authorization": f"Bearer {token}"})
    finally:
        for sock in held:
            sock.close()
    for path, statuses in seen.items():
        documented = {int(code) for code in DOC["paths"][path]["get"]["responses"]}
        assert statuses == documented, (path, statuses, documented)


# ---------------------------------------------------------------- Schemathesis


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real service for every generated request (Hypothesis runs many examples a test).
    It lives until the module ends, so tests using make_service stay above this section: that
    fixture checks no service thread is left when each of its tests ends."""
    db = tmp_path_factory.mktemp("openapi") / "api.db"
    service = Service(Settings.from_mapping({"port": 0, "db_url": f"sqlite:///{db}", "consumers": 2}))
    service.start()
    try:
        yield service.url
    finally:
        service.stop()


def _without_ndjson(doc: dict) -> dict:
    """The document minus its NDJSON body. Its schema can only say "a string", and most strings
    are not NDJSON, so generated "valid" bodies would be refused rightly; the NDJSON decoder has
    its own tests (test_decoding.py). The JSON body's schema is exact and is fuzzed here."""
    trimmed = json.loads(json.dumps(doc))
    del trimmed["paths"]["/messages"]["post"]["requestBody"]["content"]["application/x-ndjson"]
    return trimmed


# One test an operation, each under an id of its own ("POST /messages"): Schemathesis's own
# parametrize gives its items one node id, which a scheduler that keys tests by id (pytest-xdist's
# scope modes, tests/conftest.py) would run once for all six.
OPERATIONS = [result.ok() for result in schemathesis.openapi.from_dict(_without_ndjson(DOC)).get_all_operations()]


@pytest.mark.parametrize("operation", OPERATIONS, ids=[operation.label for operation in OPERATIONS])
def test_generated_requests_get_documented_replies_and_no_5xx(operation, api_url) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    def replies_as_documented(case) -> None:
        case.call_and_validate(base_url=api_url)

    replies_as_documented()
