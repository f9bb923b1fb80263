"""The listener's side of the stream: `StreamIntake`, the Intake (intake.py) of `--buffer nats://`.

Requests are published on the listener's own asyncio loop, each whole in one JetStream message
(wire.py), and a client gets its 202 only once the stream acknowledged the message that holds
its request: stored on a quorum of the stream's replicas, each fsynced (servers with
`sync_interval: always`). Publishing is a group commit: a request accepted while
MAX_IN_FLIGHT messages are on their way waits for the next one, together with every other
request accepted meanwhile (up to --max-body-bytes of them), so under load the stream's
servers store, replicate, fsync, deliver and take acks for one message per group, not one per
request; an idle listener publishes a request at once, alone. Until --enqueue-timeout runs out
(the group's oldest request's), a publish that got no definite answer is sent again with the
same `Nats-Msg-Id`, so the stream keeps one copy. Then, for every request of the group:
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
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import APIError

from ingest.errors import Backpressure, NotAListener, StreamFull, StreamUnavailable, first_line
from ingest.messages import Message, Receipt
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
# Messages a listener has on their way to the stream at once; requests accepted meanwhile wait
# and go together in the next. Two: one is acked while the next is being stored.
MAX_IN_FLIGHT = 2


class Holding:
    """Receipts kept in the ledger for `hold_s` after their 202, let go in the order they came:
    one deque on the listener's loop, not a timer each (at 8,000 requests/s, 240,000 of them)."""

    def __init__(self, ledger: Ledger, hold_s: float = HOLD_RECEIPT_S) -> None:
        self._ledger = ledger
        self._hold_s = hold_s
        self._kept: deque[tuple[float, Receipt]] = deque()

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, receipt: Receipt, now: float) -> None:
        self._kept.append((now + self._hold_s, receipt))
        self.release(now)

    def release(self, now: float) -> None:
        """Let go of every receipt whose time is up (also called by the poll: a quiet listener)."""
        kept = self._kept
        while kept and kept[0][0] <= now:
            self._ledger.withdraw(kept.popleft()[1])


@dataclass(eq=False)
class _Waiting:
    """An accepted request until the stream acked the message that holds it."""

    part: wire.Part
    deadline: float
    future: asyncio.Future[None] = field(repr=False)


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
        self._holding = Holding(ledger)
        self._status: admin.Status | None = None
        self._waiting: list[_Waiting] = []  # accepted, for the next message; only the loop's thread touches these
        self._in_flight: set[asyncio.Task[None]] = set()
        self._flush_due = False
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
        part = wire.encode_request(batch, self._reply_subject if waited_on else None)
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiting = _Waiting(part, started + self._enqueue_timeout_s, loop.create_future())
        self._waiting.append(waiting)
        self._flush_soon(loop)
        await waiting.future  # StreamFull or StreamUnavailable: the handler answers 503
        self._metrics.stream_publish_seconds.observe(loop.time() - started)
        self._after_publish(receipt, loop)

    def _flush_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """At the end of this turn of the loop, so the requests of one turn go together."""
        if not self._flush_due and len(self._in_flight) < MAX_IN_FLIGHT:
            self._flush_due = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        while self._waiting and len(self._in_flight) < MAX_IN_FLIGHT:
            group = self._take_group()
            if group:
                task = asyncio.get_running_loop().create_task(self._publish(group), name="stream-publish")
                self._in_flight.add(task)
                task.add_done_callback(self._published)

    def _take_group(self) -> list[_Waiting]:
        """The oldest waiting requests that fit together (one always does), less those whose
        client went away before they were sent."""
        group: list[_Waiting] = []
        size = 0
        while self._waiting:
            waiting = self._waiting[0]
            if group and size + waiting.part.size > self._spec.max_body_bytes:
                break
            del self._waiting[0]
            if not waiting.future.done():
                group.append(waiting)
                size += waiting.part.size
        return group

    def _published(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if self._waiting:
            self._flush_soon(asyncio.get_running_loop())

    async def _publish(self, group: list[_Waiting]) -> None:
        """One message for the group, sent until it is acked, refused, or the oldest request's
        deadline passes. Error policy: every request of the group gets the answer, an
        unexpected error too (its handler answers 500), so no client is left waiting."""
        try:
            duplicate = await self._send(group)
        except Backpressure as exc:
            for waiting in group:
                self._settle(waiting, type(exc)(str(exc), retry_after_s=exc.retry_after_s,
                                                messages=waiting.part.count))
        except asyncio.CancelledError:  # the loop ends: the outcome is unknown
            for waiting in group:
                self._settle(waiting, StreamUnavailable("the listener stopped before the stream answered",
                                                        retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
                                                        messages=waiting.part.count))
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every waiting handler, which logs it
            for waiting in group:
                self._settle(waiting, exc)
        else:
            if duplicate:
                self._metrics.stream_publish_duplicates.inc()
            for waiting in group:
                self._settle(waiting, None)

    @staticmethod
    def _settle(waiting: _Waiting, error: BaseException | None) -> None:
        if waiting.future.done():  # its client went away (the handler was cancelled)
            return
        if error is None:
            waiting.future.set_result(None)
        else:
            waiting.future.set_exception(error)

    async def _send(self, group: list[_Waiting]) -> bool:
        """Whether the stream had it already (a duplicate); StreamFull or StreamUnavailable."""
        data, headers = wire.encode([w.part for w in group], f"{self._prefix}:{next(self._counter)}")
        loop = asyncio.get_running_loop()
        deadline = min(w.deadline for w in group)
        requests = len(group)
        js = self._js
        last = "not connected"
        while js is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                ack = await js.publish(self._spec.subject, data, timeout=remaining, headers=headers)
            except APIError as exc:
                if exc.err_code in _FULL:
                    self._metrics.stream_publish_errors.labels("full").inc(requests)
                    raise StreamFull("the stream is full", retry_after_s=self._retry_after_s()) from None
                last = first_line(exc)
            except (NatsError, TimeoutError) as exc:
                last = first_line(exc) or type(exc).__name__
            else:
                return bool(ack.duplicate)
            await asyncio.sleep(min(RETRY_PAUSE_S, max(0.0, deadline - loop.time())))
        self._metrics.stream_publish_errors.labels("unavailable").inc(requests)
        log.warning("stream %s: no definite answer in %.1f s (%s); answered 503", self._spec.name,
                    self._enqueue_timeout_s, last)
        raise StreamUnavailable(
            "the stream did not answer in time: the request may or may not be kept; "
            "retry it with the same Idempotency-Key to have it stored once",
            retry_after_s=UNAVAILABLE_RETRY_AFTER_S)

    def _after_publish(self, receipt: Any, loop: asyncio.AbstractEventLoop) -> None:
        """The receipt stays in the ledger a while (a writer of this process settles it there),
        and an ack=commit client waits at most --commit-timeout for a writer's report."""
        if receipt is None:
            return
        if receipt.future is not None:
            loop.call_later(self._commit_timeout_s, self._ledger.expire, receipt,
                            f"no writer reported its commit within {self._commit_timeout_s:g} s")
        else:
            self._holding.keep(receipt, loop.time())

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
        loop = asyncio.get_running_loop()
        while True:
            self._holding.release(loop.time())
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
