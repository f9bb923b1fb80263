"""The stream feeder thread: the writer's side of the stream (stream → bounded buffer → consumers).

It runs an asyncio loop of its own (nats-py is asyncio), fetches stream messages (each one or
more whole requests, wire.py) from the durable pull consumer every writer shares, turns them
into their messages and puts these into the bounded buffer, only as room frees there
(backpressure by not fetching). The next pull is asked for before the last one's messages are
put, so the stream's deliveries and the buffer's filling overlap; at most one pull's worth
waits outside the buffer. Each fetched stream message is held, counted down as consumers settle
its messages (stored, found stored already, or dead-lettered: `settled`, called after their
commit), and acked when none is left: a stream message leaves the stream only once all of it
is in the database. A writer killed before its
ack loses nothing: the stream delivers the request again after the ack wait, to any writer, and
its identities (unique in the database) store it once.

While held, requests get in-progress acks every third of the ack wait, so a slow or stalled
database does not hand them to another writer; while the database fails, nothing new is
fetched, and the stream absorbs the backlog up to its bound.

Stop: `finish` ends the fetching (what is in the buffer is drained by the consumers); the loop
lives on to ack what they commit until `close`, which sends the last acks and disconnects.
Error policy: NATS errors are logged and retried after a pause (reconnects are nats-py's); any
other exception ends the thread, which the service notices (health.py) and stops on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from ingest.buffer import Buffer
from ingest.errors import first_line
from ingest.messages import Message, Receipt
from ingest.receipts import Ledger
from ingest.stream import client, wire
from ingest.stream.spec import DURABLE, StreamSpec

log = logging.getLogger(__name__)

FETCH_MAX = 64  # stream messages a pull asks for at most
FETCH_MIN_BYTES = 8 * 1024 * 1024  # and bytes: at least this, and room for two messages of the largest size
FETCH_WAIT_S = 1.0
PAUSE_S = 0.5  # after a NATS error, or while the database fails
PUT_WAIT_S = 0.5


@dataclass
class Report:
    """An ?ack=commit request's outcome, for the listener that waits for it."""

    reply: str
    request_id: str
    received_at: float
    counts: Counter[str] = field(default_factory=Counter)


@dataclass
class Held:
    """A fetched stream message, until every message of its requests is settled."""

    msg: Msg
    remaining: int
    reports: dict[str, Report]  # by request id: those of its requests that wait for the commit


class StreamFeeder(threading.Thread):
    def __init__(
        self, spec: StreamSpec, buffer: Buffer, *, ledger: Ledger, hard_stop: threading.Event,
        database_failing: Callable[[], bool],
        new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    ) -> None:
        super().__init__(name="stream-feeder", daemon=False)
        self._new_loop = new_loop  # the listener's kind (--event-loop): uvloop takes less CPU a delivery
        self._spec = spec
        self._buffer = buffer
        self._ledger = ledger
        self._hard_stop = hard_stop
        self._database_failing = database_failing
        self._held: dict[int, Held] = {}  # by stream sequence; only the loop's thread touches it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nc: Client | None = None
        self._finishing = threading.Event()
        self._closing: asyncio.Event | None = None
        self._answered = asyncio.Event()  # the pull request under way is over (filled or a status)
        self._woken = asyncio.Event()  # a delivery came, or the pull is over
        self._outstanding = 0
        self._arrived: list[Message] = []  # delivered and held, not yet in the buffer
        self.fetching_done = threading.Event()  # set once no fetch will put anything more
        self.malformed = 0

    def __repr__(self) -> str:
        return f"StreamFeeder(held={len(self._held)}, finishing={self._finishing.is_set()})"

    # -- from other threads -------------------------------------------------------------------

    def settled(self, stored: Sequence[Message], duplicates: Sequence[Message], dead: Sequence[Message]) -> None:
        """Consumers, after a commit: these messages are in the database (or dead-lettered)."""
        outcomes: Counter[tuple[int, str | None, str]] = Counter()
        for kind, messages in (("stored", stored), ("duplicates", duplicates), ("dead", dead)):
            for message in messages:
                if message.seq is not None:
                    outcomes[(message.seq, message.request_id, kind)] += 1
        loop = self._loop
        if outcomes and loop is not None and not loop.is_closed():
            # RuntimeError: the loop closed meanwhile: not acked, so delivered again (and stored once).
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._count, outcomes)

    def finish(self) -> None:
        """Fetch no more; the loop keeps acking what the consumers commit until close()."""
        self._finishing.set()

    def close(self) -> None:
        loop, closing = self._loop, self._closing
        self._finishing.set()
        if loop is not None and closing is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(closing.set)

    # -- the thread ----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=self._new_loop) as runner:
                runner.run(self._main())
        finally:
            self.fetching_done.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        nc = self._nc = await client.connect(self._spec.servers, "ingest-writer")
        putter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-put")
        # The consumer's ack wait, as the servers have it (`stream init` set it), not this
        # process's setting: in-progress acks must come well within it.
        ack_wait_s = (await client.consumer_info(nc, self._spec))["config"]["ack_wait"] / 1e9
        keepalive = asyncio.create_task(self._keep_alive(ack_wait_s), name="stream-in-progress")
        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=self._delivered)
        try:
            await self._fetch_until_finishing(nc, inbox, putter)
            self.fetching_done.set()
            await self._closing.wait()
        finally:
            keepalive.cancel()
            putter.shutdown(wait=True)
            await self._disconnect(nc)

    async def _fetch_until_finishing(self, nc: Client, inbox: str, putter: ThreadPoolExecutor) -> None:
        """Pull requests of our own, answered on our inbox: every message the stream delivers
        is held from the moment it arrives (nats-py's fetch can leave late deliveries in a queue
        nobody keeps alive), and put into the buffer as it comes, as room frees (not when the
        pull is filled: a quiet stream would hold it back for the pull's whole expiry). The next
        pull goes out as soon as the last is answered, before its messages are put."""
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self._spec.name}.{DURABLE}"
        max_bytes = max(FETCH_MIN_BYTES, 2 * self._spec.max_msg_size)
        pull = orjson.dumps({"batch": FETCH_MAX, "max_bytes": max_bytes, "expires": int(FETCH_WAIT_S * 1e9)})
        loop = asyncio.get_running_loop()
        pulling, given_up_at = False, 0.0
        while not self._finishing.is_set() and not self._hard_stop.is_set():
            if pulling and (self._answered.is_set() or loop.time() > given_up_at):
                pulling = False
            if not pulling and not self._database_failing():  # while it fails, keep what is held alive; take no more
                pulling = await self._pull(nc, subject, pull, inbox)
                given_up_at = loop.time() + FETCH_WAIT_S + 1  # no answer by then: the pull was lost
            if self._arrived:
                batch, self._arrived = self._arrived, []
                if not await self._put(batch, putter):
                    return
            elif pulling:
                self._woken.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), max(0.0, given_up_at - loop.time()))
            else:
                await self._pause()

    async def _pull(self, nc: Client, subject: str, pull: bytes, inbox: str) -> bool:
        """Ask for the next messages; False when the request could not be sent."""
        self._outstanding = FETCH_MAX
        self._answered.clear()
        try:
            await nc.publish(subject, pull, reply=inbox)
        except (NatsError, OSError) as exc:
            log.warning("stream %s: pull request failed, retrying: %s", self._spec.name, first_line(exc))
            return False
        return True

    async def _delivered(self, msg: Msg) -> None:
        """A delivery on our inbox: a request (held at once), or a status that ends the pull."""
        status = (msg.headers or {}).get("Status")
        if status is not None:
            if status not in ("100",):  # 404 no messages, 408 expired, 409 ...: this pull is over
                self._outstanding = 0
                self._answered.set()
                self._woken.set()
            return
        self._arrived.extend(await self._messages(msg))
        self._woken.set()
        self._outstanding -= 1
        if self._outstanding <= 0:
            self._answered.set()

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), PAUSE_S)  # type: ignore[union-attr]

    async def _messages(self, msg: Msg) -> list[Message]:
        """The messages of its requests, held by its stream sequence; none for a malformed one."""
        metadata = msg.metadata
        seq = metadata.sequence.stream
        try:
            requests = wire.decode(msg.data, msg.headers)
        except wire.Malformed as exc:
            self.malformed += 1
            log.error("stream %s: message %d terminated (never delivered again): %s", self._spec.name, seq, exc)
            await msg.term()
            return []
        first = metadata.num_delivered == 1
        if seq in self._held:  # delivered again while still held here: the held one settles it
            return []
        messages: list[Message] = []
        reports: dict[str, Report] = {}
        for request in requests:
            receipt = self._receipt(request, fresh=first)
            known = not (request.generated and first)
            received_at = request.received_at
            messages += [Message(text, received_at, ident=ident, known=known, seq=seq, receipt=receipt)
                         for text, ident in zip(request.texts, request.idents, strict=True)]
            if request.reply is not None:
                reports[request.request_id] = Report(request.reply, request.request_id, received_at)
        self._held[seq] = Held(msg, len(messages), reports)
        return messages

    def _receipt(self, request: wire.Request, *, fresh: bool) -> Receipt:
        """The receipt this process's listener opened, when it published the request; else one
        that counts into the database's row only."""
        receipt = self._ledger.get(request.request_id)
        if receipt is not None and receipt.received_at == request.received_at:
            return receipt
        return Receipt(request.request_id, len(request.texts), request.received_at,
                       fresh=request.fresh and fresh, client=request.client)

    async def _put(self, batch: list[Message], putter: ThreadPoolExecutor) -> bool:
        """Into the buffer as room frees, off the loop (acks and in-progress go on meanwhile);
        False when the buffer closed or the hard stop came (not acked: delivered again)."""
        loop = asyncio.get_running_loop()
        step = max(1, self._buffer.capacity // 2)  # a pull's worth may be more than the buffer holds
        for first in range(0, len(batch), step):
            chunk = batch[first:first + step]
            if not await loop.run_in_executor(putter, self._buffer.put_all_unless, chunk, self._hard_stop, PUT_WAIT_S):
                return False
        return True

    def _count(self, outcomes: Counter[tuple[int, str | None, str]]) -> None:
        for (seq, request_id, kind), n in outcomes.items():
            held = self._held.get(seq)
            if held is None:
                continue
            report = held.reports.get(request_id or "")
            if report is not None:
                report.counts[kind] += n
            held.remaining -= n
            if held.remaining <= 0:
                del self._held[seq]
                asyncio.get_running_loop().create_task(self._ack(held))

    async def _ack(self, held: Held) -> None:
        try:
            await held.msg.ack()
        except (NatsError, OSError) as exc:
            # Delivered again after the ack wait, and found stored: nothing is lost or doubled.
            log.warning("stream %s: ack failed: %s", self._spec.name, first_line(exc))
            return
        for report in held.reports.values():
            await self._report(report)

    async def _report(self, report: Report) -> None:
        """The commit of an ack=commit request, to the listener that waits for it."""
        counts = report.counts
        body = orjson.dumps({
            "request": report.request_id, "received": report.received_at, "stored": counts["stored"],
            "duplicates": counts["duplicates"], "dead": counts["dead"],
            "error": "refused by the database: see dead letters" if counts["dead"] else "",
        })
        nc = self._nc
        if nc is None:
            return
        try:
            await nc.publish(report.reply, body)
        except (NatsError, OSError) as exc:
            log.warning("stream %s: commit report for %s not sent: %s", self._spec.name, report.request_id,
                        first_line(exc))

    async def _keep_alive(self, ack_wait_s: float) -> None:
        """In-progress acks for held requests, so no other writer gets them meanwhile."""
        interval = max(0.1, ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            for held in list(self._held.values()):
                # Disconnected: after the ack wait the stream delivers it again.
                with contextlib.suppress(NatsError, OSError):
                    await held.msg.in_progress()

    async def _disconnect(self, nc: Client) -> None:
        await client.close(nc)
