"""Per-client rate limits: a token bucket for each client, in messages a second.

A client is its name (with --auth-tokens) or its remote address (without). A request of n
messages takes n tokens; when the bucket holds fewer, the request is refused with 429 and a
Retry-After that says when the bucket will hold enough. A request larger than the burst is let
through when the bucket is full, which leaves it in debt: one big request is not refused forever.

Used only on the listener's event loop, so it needs no lock. The table of buckets is bounded
(`max_clients`), and only a bucket that would be full by now is ever dropped from it: forgetting
a full bucket costs its client nothing, where forgetting one in debt would refill it (a sender
with many addresses could otherwise push its flooding address's empty bucket out of the table).
When the table is full and no bucket in it is full, new clients share one overflow bucket of the
same rate and burst: together they get what one client gets, never a full bucket each.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable

from ingest.errors import RateLimited

MAX_CLIENTS = 10_000
_OVERFLOW = ""  # the key of the shared bucket: no client name or address is empty


class RateLimiter:
    def __init__(
        self, rate: float, burst: float, *, max_clients: int = MAX_CLIENTS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._max_clients = max_clients
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)
        # When each bucket will be full again, earliest first: (moment, client). An entry goes stale
        # when its client takes again (a newer entry is pushed); stale ones are skipped, and the
        # heap is rebuilt from the table when they outnumber it.
        self._full_at: list[tuple[float, str]] = []
        self._overflow: tuple[float, float] | None = None  # (tokens, at) of the shared bucket

    def __repr__(self) -> str:
        return f"RateLimiter({self.rate:g}/s, burst {self.burst:g}, {len(self._buckets)} client(s))"

    def take(self, client: str, count: int) -> None:
        """Spend `count` tokens of `client`'s bucket, or raise RateLimited with the wait."""
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self._max_clients and not self._forget_a_full_bucket(now):
                client, bucket = _OVERFLOW, self._overflow
            bucket = bucket or (self.burst, now)
        tokens, at = bucket
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

    def _full_again(self, tokens: float, at: float) -> float:
        return at + max(0.0, self.burst - tokens) / self.rate

    def _remember(self, client: str, tokens: float, now: float) -> None:
        if client == _OVERFLOW:
            self._overflow = (tokens, now)
            return
        self._buckets[client] = (tokens, now)
        heapq.heappush(self._full_at, (self._full_again(tokens, now), client))
        if len(self._full_at) > 2 * len(self._buckets) + 64:
            self._full_at = [(self._full_again(*b), c) for c, b in self._buckets.items()]
            heapq.heapify(self._full_at)

    def _forget_a_full_bucket(self, now: float) -> bool:
        """Drop one bucket that would be full by now; False when every bucket is in debt."""
        heap = self._full_at
        while heap and heap[0][0] <= now:
            _, client = heapq.heappop(heap)
            bucket = self._buckets.get(client)
            if bucket is not None and self._full_again(*bucket) <= now:  # else a stale entry
                del self._buckets[client]
                return True
        return False
