"""What every handler of the HTTP side shares: the values it is built with, and how it replies."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ingest.http.auth import Tokens
from ingest.http.guard import ConnectionGuard
from ingest.http.identity import Generator
from ingest.http.ratelimit import RateLimiter
from ingest.intake import Intake
from ingest.metrics import Metrics
from ingest.receipts import Counts, Ledger

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, kw_only=True)
class RouteConfig:
    intake: Intake  # the one way into the pipeline (intake.py)
    metrics: Metrics
    max_body_bytes: int
    default_ack: str
    id_field: str | None
    identities: Generator
    tokens: Tokens | None
    metrics_token: str | None
    unprotected_warning: str | None  # said by /readyz when anyone may push from the network
    rate_limiter: RateLimiter | None
    guard: ConnectionGuard
    body_timeout_s: float
    ledger: Ledger
    # (request id, client or None without tokens) -> its counts from the database, if that client
    # may read them; blocking, so run on `lookups`
    lookup_receipt: Callable[[str, str | None], Counts | None]
    lookups: Executor
    lookup_timeout_s: float
    # --workers: this worker's exposition -> every worker's, added up (metrics_merge.py)
    merge_metrics: Callable[[str], Awaitable[str]] | None
    is_stopping: Callable[[], bool]
    is_healthy: Callable[[], bool]
    not_ready: Callable[[], str | None]  # None when ready, else why not


CONFIG = web.AppKey("config", RouteConfig)


def error_response(status: int, error: str, detail: Any = None, retry_after_s: float | None = None) -> web.Response:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else None
    return web.json_response({"error": error, "detail": detail}, status=status, headers=headers)
