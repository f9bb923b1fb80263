"""Per-client rate limits: a token bucket for each client, in messages a second.

A client is its name (with --auth-tokens) or its remote address (without). A request of n
messages takes n tokens; when the bucket holds fewer, the request is refused with 429 and a
Retry-After that says when the bucket will hold enough. A request larger than the burst is let
through when the bucket is full, which leaves it in debt: one big request is not refused forever.

Used only on the listener's event loop, so it needs no lock. The table of buckets is bounded: past
`max_clients`, the bucket idle longest is dropped (an idle bucket is full, so forgetting it costs
its client nothing).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from ingest.errors import RateLimited

MAX_CLIENTS = 10_000


class RateLimiter:
    def __init__(
        self, rate: float, burst: float, *, max_clients: int = MAX_CLIENTS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def __repr__(self) -> str:
        return f"RateLimiter({self.rate:g}/s, burst {self.burst:g}, {len(self._buckets)} client(s))"

    def take(self, client: str, count: int) -> None:
        """Spend `count` tokens of `client`'s bucket, or raise RateLimited with the wait."""
        now = self._clock()
        tokens, at = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        needed = min(count, self.burst)
        if tokens < needed:
            self._remember(client, tokens, now)
            wait_s = (needed - tokens) / self.rate
            raise RateLimited(
                f"rate limit: {self.rate:g} messages/s with a burst of {self.burst:g}; "
                f"try again in {math.ceil(wait_s)} s",
                retry_after_s=wait_s,
                messages=count,
            )
        self._remember(client, tokens - count, now)

    def _remember(self, client: str, tokens: float, now: float) -> None:
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
