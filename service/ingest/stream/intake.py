"""The listener's side of the stream: `StreamIntake`, the Intake (intake.py) of `--buffer nats://`.

A request is published as one JetStream message (wire.py) on the listener's own asyncio loop,
and the client gets its 202 only once the stream acknowledged it: stored on a quorum of the
stream's replicas, each fsynced (servers with `sync_interval: always`). Until --enqueue-timeout
runs out, a publish that got no definite answer is sent again with the same `Nats-Msg-Id`, so
the stream keeps one copy. Then:
- the stream's ack (a duplicate's too) → 202;
- the stream full (`discard: new`, error 10077/10078) → 503 StreamFull, Retry-After from the
  backlog at the rate the writers drained it lately (pace.py);
- no definite answer by the deadline (an election, quorum lost, no server) → 503
  StreamUnavailable: the request may be in the stream or not; retried with an Idempotency-Key
  it is stored once.

A poll every POLL_INTERVAL_S reads the stream's and the consumer's state: the metrics, the
backlog behind Retry-After, and whether the stream answers (/readyz). The same object, not
accepting, serves a writer (`ingest write`) its metrics and readiness.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import APIError

from ingest.errors import NotAListener, StreamFull, StreamUnavailable, first_line
from ingest.messages import Message
from ingest.metrics import Metrics
from ingest.pace import Throughput
from ingest.receipts import Ledger
from ingest.stream import admin, client, wire
from ingest.stream.spec import StreamSpec

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 2.0
RETRY_PAUSE_S = 0.1  # between publishes that failed at once (no responders, a 503 of the stream)
UNAVAILABLE_RETRY_AFTER_S = 2.0
_FULL = (10077, 10078)  # maximum bytes / messages exceeded, with discard new
# Held after the 202 for receipts asked of this listener before a writer commits: by then the
# request's row is in the database; the ledger stays bounded by this many seconds of requests.
HOLD_RECEIPT_S = 30.0
REPLY_PREFIX = "_INGEST.reply"


class StreamIntake:
    assigns_identities = True  # a writer may store a request twice (killed between commit and ack)

    def __init__(
        self, spec: StreamSpec, *, ledger: Ledger, metrics: Metrics, enqueue_timeout_s: float,
        commit_timeout_s: float, accepting: bool = True,
    ) -> None:
        self._spec = spec
        self._ledger = ledger
        self._metrics = metrics
        self._enqueue_timeout_s = enqueue_timeout_s
        self._commit_timeout_s = commit_timeout_s
        self._accepting = accepting
        self._prefix = uuid.uuid4().hex[:12]
        self._counter = itertools.count(1)
        self._reply_subject = f"{REPLY_PREFIX}.{self._prefix}"
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None  # made once with the connection, not per request
        self._drained = Throughput()
        self._status: admin.Status | None = None
        self.unreachable: str | None = "not connected yet"  # why the stream does not answer; None when it does

    def __repr__(self) -> str:
        return f"StreamIntake({self._spec.name}, unreachable={self.unreachable!r})"

    async def lifespan(self, _app: web.Application) -> AsyncIterator[None]:
        """On the listener's loop (aiohttp's cleanup context): connect before the port opens,
        close after the last response."""
        nc = await client.connect(self._spec.servers, "ingest-listener" if self._accepting else "ingest-writer")
        self._nc = nc
        self._js = nc.jetstream()
        if self._accepting:
            await nc.subscribe(self._reply_subject, cb=self._on_reply)
        poll = asyncio.create_task(self._poll(nc), name="stream-poll")
        try:
            yield
        finally:
            poll.cancel()
            await client.close(nc)

    # -- accepting --------------------------------------------------------------------------

    async def submit(self, batch: list[Message]) -> None:
        if not self._accepting:
            raise NotAListener("this is a writer (ingest write): send messages to a listener (ingest serve)",
                               messages=len(batch))
        receipt = batch[0].receipt
        waited_on = receipt is not None and receipt.future is not None
        data, headers = wire.encode(batch, f"{self._prefix}:{next(self._counter)}",
                                    self._reply_subject if waited_on else None)
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self._enqueue_timeout_s
        js = self._js
        last = "not connected"
        while js is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                ack = await js.publish(self._spec.subject, data, timeout=remaining, headers=dict(headers))
            except APIError as exc:
                if exc.err_code in _FULL:
                    self._metrics.stream_publish_errors.labels("full").inc()
                    raise StreamFull("the stream is full", retry_after_s=self._retry_after_s(),
                                     messages=len(batch)) from None
                last = first_line(exc)
            except (NatsError, TimeoutError) as exc:
                last = first_line(exc) or type(exc).__name__
            else:
                self._metrics.stream_publish_seconds.observe(loop.time() - started)
                if ack.duplicate:
                    self._metrics.stream_publish_duplicates.inc()
                self._after_publish(receipt, loop)
                return
            await asyncio.sleep(min(RETRY_PAUSE_S, max(0.0, deadline - loop.time())))
        self._metrics.stream_publish_errors.labels("unavailable").inc()
        log.warning("stream %s: no definite answer in %.1f s (%s); answered 503", self._spec.name,
                    self._enqueue_timeout_s, last)
        raise StreamUnavailable(
            "the stream did not answer in time: the request may or may not be kept; "
            "retry it with the same Idempotency-Key to have it stored once",
            retry_after_s=UNAVAILABLE_RETRY_AFTER_S, messages=len(batch))

    def _after_publish(self, receipt: Any, loop: asyncio.AbstractEventLoop) -> None:
        """The receipt stays in the ledger a while (a writer of this process settles it there),
        and an ack=commit client waits at most --commit-timeout for a writer's report."""
        if receipt is None:
            return
        if receipt.future is not None:
            loop.call_later(self._commit_timeout_s, self._ledger.expire, receipt,
                            f"no writer reported its commit within {self._commit_timeout_s:g} s")
        else:
            loop.call_later(HOLD_RECEIPT_S, self._ledger.withdraw, receipt)

    async def _on_reply(self, msg: Msg) -> None:
        """A writer's report of an ack=commit request: its counts, settled into the receipt."""
        try:
            report = orjson.loads(msg.data)
            self._ledger.reported(
                str(report["request"]), float(report["received"]), stored=int(report["stored"]),
                duplicates=int(report["duplicates"]), dead=int(report["dead"]), error=str(report.get("error", "")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("ignored a malformed commit report: %s", exc)

    def backlog(self) -> int:
        return self._status.messages if self._status is not None else 0

    def _retry_after_s(self) -> float:
        return self._drained.retry_after_s(self.backlog())

    # -- polling ------------------------------------------------------------------------------

    async def _poll(self, nc: Client) -> None:
        last: tuple[int, int] | None = None  # (last sequence, messages) of the previous poll
        while True:
            try:
                status, stream = await self._read(nc)
            except (NatsError, TimeoutError, RuntimeError, client.Missing) as exc:
                self.unreachable = f"stream {self._spec.name}: {first_line(exc) or type(exc).__name__}"
                self._metrics.stream_up.set(0)
            else:
                self.unreachable = None
                self._metrics.stream_up.set(1)
                self._status = status
                self._show(status)
                now = (int(stream["state"]["last_seq"]), status.messages)
                if last is not None:
                    # Work queue: a message leaves once acked, that is once stored.
                    self._drained.record(max(0, (now[0] - last[0]) - (now[1] - last[1])))
                last = now
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _read(self, nc: Client) -> tuple[admin.Status, dict[str, Any]]:
        stream = await client.stream_info(nc, self._spec)
        try:
            consumer: dict[str, Any] | None = await client.consumer_info(nc, self._spec)
        except client.Missing:
            consumer = None
        return admin.Status.of(stream, consumer, time.time()), stream

    def _show(self, status: admin.Status) -> None:
        m = self._metrics
        m.stream_messages.set(status.messages)
        m.stream_bytes.set(status.bytes)
        m.stream_capacity_bytes.set(status.max_bytes)
        m.stream_pending.set(status.pending)
        m.stream_ack_pending.set(status.ack_pending)
        m.stream_redelivered.set(status.redelivered)
        m.stream_replicas.set(status.replicas)
        m.stream_replicas_current.set(status.replicas_current)
