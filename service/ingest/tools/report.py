"""What `ingest push` tells its user: the summary at the end and the progress bar on the way.

Client side, like push.py; pure formatting, no I/O but the stream it is given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

PROGRESS_INTERVAL_S = 0.1
ERRORS_SHOWN = 3


@dataclass
class PushSummary:
    """What one run achieved.

    Counts are messages, except `retried` (re-sends of a request) and `errors` (each distinct final
    error -> the requests it ended); `latencies_s` has one entry per acknowledged request.
    """

    count: int
    sent: int = 0
    acknowledged: int = 0
    retried: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    waited_s: float = 0.0  # spent waiting before re-sends, as Retry-After or backoff asked
    latencies_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    receipts: Receipts | None = None  # with --receipts: what the sampled requests' receipts said
    stopped_by: str | None = None  # the signal that ended the run early

    @property
    def ok(self) -> bool:
        receipts_ok = self.receipts is None or self.receipts.all_stored
        return self.failed == 0 and self.acknowledged == self.sent == self.count and receipts_ok

    @property
    def messages_per_s(self) -> float:
        return self.acknowledged / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def format(self) -> str:
        lines = [
            f"sent          {self.sent} of {self.count} messages"
            + (f" ({self.count - self.sent} not sent)" if self.sent < self.count else ""),
            f"acknowledged  {self.acknowledged}",
            f"retried       {self.retried} re-sends after a 503, a 429 or a connection error"
            + (f"; waited {self.waited_s:.1f} s in all" if self.retried else ""),
            f"failed        {self.failed} messages",
            f"throughput    {self.messages_per_s:.1f} messages/s over {self.elapsed_s:.2f} s",
            f"latency       {_latency_line(self.latencies_s)}",
        ]
        if self.stopped_by is not None:
            lines.append(f"stopped       by {self.stopped_by}; {self.sent - self.acknowledged - self.failed} "
                         "messages in flight then have no answer")
        shown = list(self.errors.items())[:ERRORS_SHOWN]
        if self.receipts is not None:
            lines.append(f"receipts      {self.receipts.format()}")
        lines += [f"error         {text} ({n} requests)" for text, n in shown]
        if len(self.errors) > ERRORS_SHOWN:
            lines.append(
                f"              and {len(self.errors) - ERRORS_SHOWN} more distinct errors"
            )
        return "\n".join(lines)


@dataclass
class Receipts:
    """GET /requests/{id} for a sample of acknowledged requests, once each has settled (or the
    wait ran out). Counts are requests."""

    requests: int  # acknowledged requests, sampled from
    checked: int = 0
    stored: int = 0  # every message in the database
    dead_lettered: int = 0  # some message refused by the database (in dead_letters)
    pending: int = 0  # not all stored when the wait ran out
    unknown: int = 0  # the service did not know the id, or did not answer
    waited_s: float = 0.0

    @property
    def all_stored(self) -> bool:
        return self.stored == self.checked

    def format(self) -> str:
        line = f"{self.checked} of {self.requests} requests checked"
        if self.all_stored:
            return f"{line}: all stored (after {self.waited_s:.1f} s)"
        parts = [f"{n} {what}" for n, what in (
            (self.stored, "all stored"), (self.dead_lettered, "with dead letters"),
            (self.pending, f"still pending after {self.waited_s:.0f} s"), (self.unknown, "unknown to the service"),
        ) if n]
        return f"{line}: NOT all stored: " + ", ".join(parts)


def _latency_line(latencies_s: Sequence[float]) -> str:
    if not latencies_s:
        return "no request acknowledged"
    ordered = sorted(latencies_s)
    parts = [f"p{p} {percentile(ordered, p) * 1000:.1f} ms" for p in (50, 95, 99)]
    return "  ".join(parts) + f"  ({len(ordered)} requests)"


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: always a value that was observed, never an interpolation."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


class ProgressBar:
    """One terminal line redrawn in place, throttled so a fast run does not spend its time printing."""

    def __init__(self, stream: TextIO, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._clock = clock
        self._started_s = clock()
        self._drawn_s: float | None = None
        self._last = (0, 0)
        self._finished = False

    def __call__(self, acknowledged: int, total: int) -> None:
        if self._finished:
            return
        self._last = (acknowledged, total)
        now_s = self._clock()
        done = acknowledged >= total
        if done or self._drawn_s is None or now_s - self._drawn_s >= PROGRESS_INTERVAL_S:
            self._draw(now_s, final=done)

    def close(self) -> None:
        """End the line after a run that did not acknowledge everything; harmless otherwise."""
        if not self._finished and self._drawn_s is not None:
            self._draw(self._clock(), final=True)

    def _draw(self, now_s: float, *, final: bool) -> None:
        acknowledged, total = self._last
        fraction = acknowledged / total if total else 1.0
        filled = round(fraction * 30)
        elapsed_s = now_s - self._started_s
        rate = acknowledged / elapsed_s if elapsed_s > 0 else 0.0
        width = len(str(total))
        self._stream.write(
            f"\r[{'#' * filled}{'-' * (30 - filled)}] {acknowledged:>{width}}/{total}"
            f" {fraction:4.0%} {rate:9.0f} msg/s" + ("\n" if final else "")
        )
        self._stream.flush()
        self._drawn_s = now_s
        self._finished = final


def progress_bar(stream: TextIO) -> ProgressBar:
    """A `progress` callback for `run` when `stream` is a terminal; call `.close()` after the run."""
    return ProgressBar(stream)
