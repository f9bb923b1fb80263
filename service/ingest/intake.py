"""The one door between HTTP and the pipeline: how an accepted request's messages get in.

The handlers (routes.py) know only this port. Each way in decides what a 202 means and what a
refusal costs the client:
- `BufferIntake`: into the bounded memory buffer; at once when there is room, otherwise waiting
  on a small executor (never on the event loop) until `enqueue_timeout_s`; 202 means in memory.
- `SpoolIntake` (spool_writer.py's group commit): 202 once the request is on disk.
A refusal for want of room (QueueFull, SpoolFull) carries its Retry-After: when there is likely
room for the refused messages (pace.py). A new way in (a replicated stream) is one more
class here, and the handlers do not change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Protocol

from ingest.buffer import Buffer
from ingest.errors import QueueFull, SpoolFull
from ingest.messages import Message
from ingest.spool.writer import SpoolWriter


class Intake(Protocol):
    # Whether messages without a key need an identity made for them: a way in that may hand a
    # message to the store twice (the spool, after a crash between the commit and its delete).
    assigns_identities: bool

    async def submit(self, batch: list[Message]) -> None:
        """In, all or none, or a Backpressure error (with its Retry-After) saying why not."""
        ...


class BufferIntake:
    assigns_identities = False

    def __init__(
        self, buffer: Buffer, *, executor: Executor, enqueue_timeout_s: float, retry_after_s: Callable[[int], float]
    ) -> None:
        self._buffer = buffer
        self._executor = executor
        self._enqueue_timeout_s = enqueue_timeout_s
        self._retry_after_s = retry_after_s

    async def submit(self, batch: list[Message]) -> None:
        if self._buffer.try_put_all(batch):
            return
        deadline = time.monotonic() + self._enqueue_timeout_s
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._buffer.put_all, batch, deadline)
        except QueueFull as exc:
            exc.retry_after_s = self._retry_after_s(len(batch))
            raise


class SpoolIntake:
    assigns_identities = True

    def __init__(self, writer: SpoolWriter, *, retry_after_s: Callable[[int], float]) -> None:
        self._writer = writer
        self._retry_after_s = retry_after_s

    async def submit(self, batch: list[Message]) -> None:
        future = asyncio.get_running_loop().create_future()
        try:
            self._writer.submit_on_loop(batch, future)
            await future
        except SpoolFull as exc:
            exc.retry_after_s = self._retry_after_s(len(batch))
            raise
