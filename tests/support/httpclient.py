"""A tiny blocking HTTP client over real loopback sockets, for tests."""

from __future__ import annotations

import gzip
import http.client
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def counts(self) -> dict[str, Any]:
        """A 2xx reply's body without its request id, after checking the id is there, twice."""
        body = dict(self.json())
        request_id = body.pop("request")
        assert request_id and self.headers["x-request-id"] == request_id, (request_id, self.headers)
        return body


def request(
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> Reply:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def post_json(url: str, value: Any, *, compress: bool = False, query: str = "") -> Reply:
    body = json.dumps(value).encode()
    headers = {"Content-Type": "application/json"}
    if compress:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return request(f"{url}/messages{query}", "POST", body, headers)


def post_ndjson(url: str, values: list[Any], query: str = "") -> Reply:
    body = b"".join(json.dumps(v).encode() + b"\n" for v in values)
    return request(f"{url}/messages{query}", "POST", body, {"Content-Type": "application/x-ndjson"})
