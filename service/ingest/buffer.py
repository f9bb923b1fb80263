"""The bounded buffer between the listener and the consumers, bounded in messages.

One Lock with three Conditions (like queue.Queue, plus one), with the operations this pipeline
needs: a request's messages go in all or none, consumers take batches with a linger, a dying
consumer hands its batch back at the head, and `close()` lets consumers see the flow has ended.

Wake-ups are rationed, because every needless one costs the listener the GIL: while a consumer
lingers to fill its batch, puts wake nobody until the batch is full, an idle consumer is woken
only when there is more than the lingering ones will take, and a take wakes one waiting put,
which wakes the next if room is left.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence

from ingest.errors import QueueFull, ShuttingDown, TooLarge
from ingest.messages import Message


class Buffer:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[Message] = deque()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # an idle consumer has something to take
        self._filled = threading.Condition(self._lock)  # a lingering consumer's batch is full
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self._lingering = 0  # consumers waiting for their batch to fill
        self._batch_target = 1  # the batch size lingering consumers wait for

    def __repr__(self) -> str:
        return f"Buffer(depth={len(self._items)}, capacity={self.capacity}, closed={self._closed})"

    def depth(self) -> int:
        # len() of a deque is atomic under the GIL; a gauge may read it without the lock.
        return len(self._items)

    def try_put_all(self, messages: Sequence[Message]) -> bool:
        """Enqueue all messages if there is room now; never blocks (safe on the event loop)."""
        with self._lock:
            self._check_open(len(messages))
            if len(self._items) + len(messages) > self.capacity:
                return False
            self._append(messages)
            return True

    def put_all(self, messages: Sequence[Message], deadline: float) -> None:
        """Enqueue all messages or none, waiting until `deadline` (time.monotonic) for room."""
        with self._lock:
            self._check_open(len(messages))
            while len(self._items) + len(messages) > self.capacity:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QueueFull(f"queue is full ({self.capacity} messages)", messages=len(messages))
                self._not_full.wait(remaining)
                self._check_open(len(messages))
            self._append(messages)
            if len(self._items) < self.capacity:
                self._not_full.notify()  # pass the baton: there may be room for the next waiter

    def put_all_unless(self, messages: Sequence[Message], stop: threading.Event, wait_s: float) -> bool:
        """Enqueue all messages, waiting for room as long as it takes, for feeders whose messages
        are kept elsewhere (a spool, a stream): False once `stop` is set (looked at every `wait_s`)
        or the buffer closed, and they stay where they are kept."""
        while True:
            try:
                self.put_all(messages, time.monotonic() + wait_s)
                return True
            except QueueFull:
                if stop.is_set():
                    return False
            except ShuttingDown:
                return False

    def _check_open(self, count: int) -> None:
        if self._closed:
            raise ShuttingDown("service is shutting down", messages=count)
        if count > self.capacity:
            raise TooLarge(
                f"request has {count} messages, more than the queue holds ({self.capacity})",
                {"limit": self.capacity},
                messages=count,
            )

    def _append(self, messages: Sequence[Message]) -> None:
        self._items.extend(messages)
        if self._lingering and len(self._items) >= self._batch_target:
            self._filled.notify()
        if self._has_work_for_idle():
            self._work.notify()

    def _has_work_for_idle(self) -> bool:
        return len(self._items) > self._lingering * self._batch_target

    def take(self, max_count: int, linger_s: float, wait_s: float) -> list[Message]:
        """Up to `max_count` messages: wait `wait_s` for work, then `linger_s` to fill up.

        Returns an empty list when nothing arrived in `wait_s`, so the caller can look at its
        stop flags, or at once when the buffer is closed and empty.
        """
        with self._lock:
            self._batch_target = max_count
            deadline = time.monotonic() + wait_s
            while not self._closed and not self._has_work_for_idle():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._work.wait(remaining)
            if self._items and len(self._items) < max_count and not self._closed and linger_s > 0:
                self._linger(max_count, linger_s)
            batch = [self._items.popleft() for _ in range(min(max_count, len(self._items)))]
            if batch:
                # One waiting producer, not all: under a burst dozens wait, and waking them all
                # on every take costs the listener the GIL for each that finds no room.
                self._not_full.notify()
            if self._has_work_for_idle():
                self._work.notify()  # pass the baton: there is more than this batch
            return batch

    def _linger(self, max_count: int, linger_s: float) -> None:
        self._lingering += 1
        try:
            linger_until = time.monotonic() + linger_s
            while len(self._items) < max_count and not self._closed:
                remaining = linger_until - time.monotonic()
                if remaining <= 0:
                    return
                self._filled.wait(remaining)
        finally:
            self._lingering -= 1

    def requeue(self, batch: Sequence[Message]) -> None:
        """Put a batch back at the head, past the capacity bound.

        The overshoot is at most consumers * batch size, and taking it back is the only way a
        dying consumer can keep what it held.
        """
        with self._lock:
            self._items.extendleft(reversed(batch))
            self._work.notify_all()
            self._filled.notify_all()

    def close(self) -> None:
        """No more puts; waiting puts fail with ShuttingDown, consumers drain what is left."""
        with self._lock:
            self._closed = True
            self._work.notify_all()
            self._filled.notify_all()
            self._not_full.notify_all()

    def drained(self) -> bool:
        with self._lock:
            return self._closed and not self._items

    def take_all(self) -> list[Message]:
        """Empty the buffer: what is left when the drain deadline passes."""
        with self._lock:
            batch = list(self._items)
            self._items.clear()
            self._not_full.notify_all()
            return batch
