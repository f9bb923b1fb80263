"""What `ingest push` makes of an answer, or of its absence: when to try again, and the words for a failure.

Pure functions of a status, a header, a body or an error, so the retry policy can be tested
without a service; push.py decides, with them, what one attempt's outcome is.
"""

from __future__ import annotations

import json
import math

import aiohttp

RETRY_AFTER_DEFAULT_S = 1.0
RETRY_AFTER_CAP_S = 30.0
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 5.0
ERROR_TEXT_LIMIT = 200


def retry_after_s(header: str | None) -> float:
    """The wait a 503 asks for: delta-seconds only, capped so one reply cannot stall the run."""
    try:
        value = float(header) if header is not None else RETRY_AFTER_DEFAULT_S
    except ValueError:
        return RETRY_AFTER_DEFAULT_S
    if not math.isfinite(value):
        return RETRY_AFTER_DEFAULT_S
    return min(max(value, 0.0), RETRY_AFTER_CAP_S)


def backoff_s(attempt: int, jitter: float) -> float:
    """Capped exponential backoff after failed `attempt` (1-based); `jitter` in [0, 1] spreads it."""
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0 ** (attempt - 1)) * (0.5 + jitter / 2)


def describe_response(status: int, body: bytes) -> str:
    """One line for a refused request: the service's JSON error, compacted, or its text."""
    try:
        text = json.dumps(json.loads(body), separators=(",", ":"))
    except ValueError:
        text = " ".join(body.decode("utf-8", "replace").split())
    if len(text) > ERROR_TEXT_LIMIT:
        text = text[: ERROR_TEXT_LIMIT - 1] + "…"
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


def describe_connection_error(exc: aiohttp.ClientConnectionError) -> str:
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    return str(exc) or type(exc).__name__
