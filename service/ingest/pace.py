"""How fast the database takes messages now: what a 503's Retry-After is computed from.

Consumers record what each commit settled; the listener asks, when it must refuse for a full queue
or a full spool, how long the backlog ahead of the client will take at the recent rate. A fast
database gives a short wait, a stalled one a growing wait (the recent rate falls toward zero as
the window slides past the last commit), bounded to 1-60 s.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

RETRY_AFTER_MIN_S = 1.0
RETRY_AFTER_MAX_S = 60.0


class Throughput:
    """Messages settled per second over the last `window_s`; several consumers record into it."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._records: deque[tuple[float, int]] = deque()
        self._ever = False

    def __repr__(self) -> str:
        return f"Throughput({self.rate():.0f}/s over {self.window_s:g} s)"

    def __len__(self) -> int:
        """Records held: those of the last window, as every record() trims the older ones."""
        return len(self._records)

    def record(self, count: int) -> None:
        with self._lock:
            now = self._clock()
            self._records.append((now, count))
            self._ever = True
            # Trimmed here, not only when asked for the rate: a service that never refuses
            # never asks, and one record a batch grew its memory for ever (a 60 M soak: +8 MiB).
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._records and self._records[0][0] < now - self.window_s:
            self._records.popleft()

    def rate(self) -> float | None:
        """Messages a second lately; None before the first commit (nothing known yet)."""
        with self._lock:
            self._trim(self._clock())
            if not self._ever:
                return None
            return sum(count for _, count in self._records) / self.window_s

    def retry_after_s(self, backlog: int) -> float:
        """When room is likely: the backlog at the recent rate, 1-60 s (60 when nothing is stored)."""
        rate = self.rate()
        if rate is None:
            return RETRY_AFTER_MIN_S
        if rate <= 0:
            return RETRY_AFTER_MAX_S
        return min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, math.ceil(backlog / rate)))
