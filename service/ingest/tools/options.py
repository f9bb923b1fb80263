"""What `ingest push` is asked to do: PushOptions, checked before any I/O, and the schedule they set.

The pacing model is part of what the options mean (see PushOptions), so `due_s`, which computes
it, lives beside them; push.py only asks it when each request is due.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass

from ingest.errors import ConfigError
from ingest.vocabulary import ACK_MODES

BURST_INTERVAL_S = 1.0


@dataclass(frozen=True, kw_only=True)
class PushOptions:
    """What to send and how fast; checked on construction, so a bad value fails before any I/O.

    Pacing, counted from the start of the run: with `rate`, message n is due at n / rate s. With
    `burst`, `burst` extra messages are due at once at the start and every BURST_INTERVAL_S (1 s)
    after; with `burst` but no `rate`, the load is those bursts only. A request leaves when its
    first message is due; requests held back by `concurrency` or retries leave as soon as a slot
    frees, catching up with the schedule.
    """

    url: str
    count: int
    batch: int = 100
    concurrency: int = 16
    rate: float | None = None
    burst: int = 0
    ack: str = "enqueue"
    request_timeout_s: float = 60.0
    max_attempts: int = 50
    gzip: bool = False
    idempotent: bool = False  # an Idempotency-Key on every request, so any retry is safe
    token: str | None = None  # sent as Authorization: Bearer, for a service with --auth-tokens
    cacert: str | None = None  # a CA file to trust for https:// (a service with --tls-cert)
    receipts: bool = False  # at the end, check that a sample of the requests is stored
    receipt_timeout_s: float = 60.0  # how long the check waits for pending messages

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem is not None:
            raise ConfigError(f"push: {problem}")


def _problem(o: PushOptions) -> str | None:
    """The first thing wrong with `o`, as one line, or None."""
    rate_ok = o.rate is None or (o.rate > 0 and math.isfinite(o.rate))
    checks = (
        (o.url.startswith(("http://", "https://")), f"url must be http(s)://…, got {o.url!r}"),
        (o.count >= 0, f"count must be >= 0, got {o.count}"),
        (o.batch >= 1, f"batch must be >= 1, got {o.batch}"),
        (o.concurrency >= 1, f"concurrency must be >= 1, got {o.concurrency}"),
        (rate_ok, f"rate must be a positive number of messages/s, got {o.rate}"),
        (o.burst >= 0, f"burst must be >= 0, got {o.burst}"),
        (o.ack in ACK_MODES, f"ack must be one of {', '.join(ACK_MODES)}, got {o.ack!r}"),
        (o.request_timeout_s > 0, f"request_timeout_s must be > 0, got {o.request_timeout_s}"),
        (o.max_attempts >= 1, f"max_attempts must be >= 1, got {o.max_attempts}"),
        (o.receipt_timeout_s > 0, f"receipt_timeout_s must be > 0, got {o.receipt_timeout_s}"),
    )
    return next((message for ok, message in checks if not ok), None)


def due_s(
    seq: int, *, rate: float | None, burst: int, interval_s: float = BURST_INTERVAL_S
) -> float:
    """When message `seq` may leave, in seconds from the start (the model is in PushOptions)."""
    if rate is None:
        return 0.0 if burst == 0 else (seq // burst) * interval_s
    if burst == 0:
        return seq / rate
    # Merge the steady slots (one at each j / rate) with the burst slots (`burst` at each
    # i * interval_s): message `seq` takes the slot of rank `seq`, so find the first time, among
    # either kind of slot, by which more than `seq` slots exist.
    steady = bisect_left(
        range(seq + 1),
        True,
        key=lambda j: j + 1 + burst * (math.floor(j / rate / interval_s) + 1) > seq,
    )
    bursts = bisect_left(
        range(seq // burst + 1),
        True,
        key=lambda i: math.floor(i * interval_s * rate) + 1 + burst * (i + 1) > seq,
    )
    return min(steady / rate, bursts * interval_s)
