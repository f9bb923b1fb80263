"""How fast the database takes messages now: what a 503's Retry-After is computed from.

Consumers record what each commit settled; the listener, when it must refuse for a full queue or a
full spool, records what the refused request asked for and asks how long until there is room for
it. Room for a client is its own messages plus what the other clients refused in the last second
asked for (they come back too), at the recent store rate. Not the whole backlog: that told 64
clients to wait ~27 s each while the service drained in a few and then sat idle (issue 19). The
wait is spread by jitter so that clients refused together do not come back together; a stalled
database gives the longest wait (the recent rate falls toward zero as the window slides past the
last commit). Bounded to 1-60 s.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable

RETRY_AFTER_MIN_S = 1.0
RETRY_AFTER_MAX_S = 60.0
REFUSED_WINDOW_S = 1.0  # refusals this recent are clients about to come back
JITTER = 0.5  # a wait is spread over [1 - JITTER, 1 + JITTER] times the computed one


class Throughput:
    """Messages settled per second over the last `window_s`, and what refused requests asked for
    in the last second; several consumers and the listener record into it."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 jitter: Callable[[], float] = random.random) -> None:
        self.window_s = window_s
        self._clock = clock
        self._jitter = jitter  # uniform in [0, 1); a test passes a constant
        self._lock = threading.Lock()
        self._records: deque[tuple[float, int]] = deque()
        self._refusals: deque[tuple[float, int]] = deque()
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
            _trim(self._records, now - self.window_s)

    def rate(self) -> float | None:
        """Messages a second lately; None before the first commit (nothing known yet)."""
        with self._lock:
            return self._rate(self._clock())

    def _rate(self, now: float) -> float | None:
        _trim(self._records, now - self.window_s)
        if not self._ever:
            return None
        return sum(count for _, count in self._records) / self.window_s

    def retry_after_s(self, messages: int) -> float:
        """A request of `messages` is refused: when there is likely room for it, 1-60 s.

        Its own messages plus those refused in the last second, at the recent rate, times a
        jitter factor; 1 s before anything is known, 60 s while nothing is stored.
        """
        with self._lock:
            now = self._clock()
            _trim(self._refusals, now - REFUSED_WINDOW_S)
            demand = messages + sum(count for _, count in self._refusals)
            self._refusals.append((now, messages))
            rate = self._rate(now)
        if rate is None:
            return RETRY_AFTER_MIN_S
        if rate <= 0:
            return RETRY_AFTER_MAX_S
        spread = 1 - JITTER + 2 * JITTER * self._jitter()
        return min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, demand / rate * spread))


def _trim(records: deque[tuple[float, int]], since: float) -> None:
    while records and records[0][0] < since:
        records.popleft()
