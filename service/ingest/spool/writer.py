"""The spool writer thread: group commit of accepted requests to the spool file.

One more producer-consumer stage. Listener handlers `submit_on_loop` a request's messages and
await their asyncio future; this thread takes every request that is waiting, writes each as one
row (and deletes the rows whose every message consumers have stored since) in one transaction,
commits once (an fsync with sync=full), then settles their futures: the handlers answer 202.
Under load, many requests share one fsync, and a request costs one row however many messages it
holds. The futures of one commit are settled by one callback on their loop: the listener is
woken once a commit, not once a request (a concurrent Future and `asyncio.wrap_future` a request
were 5-9 % of the listener's GIL samples). `submit` (a concurrent Future) is for threads.

A committed request is also handed to the feeder in memory (`take_fresh`), up to `hand_off`
messages waiting there: the feeder then puts the very messages the listener made into the
buffer, instead of reading back and splitting what was just written. Past that bound (the
database slower than the clients) the feeder reads the file, so memory stays bounded.

A row leaves the file once the last of its messages is in the database (stored, duplicate or
dead-lettered): the feeder `track`s each row it feeds with its message count, consumers
`forget` what they stored, and the next commit deletes the rows that count reached zero for.

The spool is bounded in bytes: a submit that would pass `max_bytes` is refused at once (503).
Error policy: a failed commit (a full disk, an I/O error) fails the requests it held with
SpoolUnavailable (503, the client retries) and keeps the deletions for the next commit; the
thread carries on. Anything else is logged and ends the thread; the service notices and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ingest.errors import ShuttingDown, SpoolError, SpoolFull, SpoolUnavailable
from ingest.messages import Message, Receipt
from ingest.spool import file as spool
from ingest.spool.absorb import absorb

log = logging.getLogger(__name__)

# What a waiting ack=commit client hears when its messages outlast a shutdown in the spool.
KEPT_IN_SPOOL = "not stored before shutdown; kept in the spool for the next start"
# An emptied spool gives its free pages back to the file system once they are more than this.
SHRINK_BYTES = 8 * 1024 * 1024


# What a submit's outcome settles: a thread's Future, or an asyncio future on its loop.
Waiter = Future[None] | asyncio.Future[None]


@dataclass
class _Submit:
    batch: list[Message]
    packed: spool.Packed  # its row's strings, made on the submitting thread
    waiter: Waiter
    seq: int = 0  # its row, once written


@dataclass(frozen=True)
class Fresh:
    """A request just committed, handed to the feeder as the listener made it."""

    seq: int
    batch: list[Message]
    bytes: int


_Absorb = tuple[Path, spool.Status, "Future[None]"]


class SpoolWriter(threading.Thread):
    """Non-daemon: requests it holds have not been answered yet, and deletions not written."""

    def __init__(self, path: Path, *, sync: str, max_bytes: int, hand_off: int = 2_000) -> None:
        super().__init__(name="spool-writer", daemon=False)
        self.path = path
        self.sync = sync
        self.max_bytes = max_bytes
        self._hand_off = hand_off
        self._conn: sqlite3.Connection | None = None
        self._claim: IO[bytes] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # submits or deletions are waiting
        self._committed = threading.Condition(self._lock)  # committed_seq moved on
        self._submits: list[_Submit] = []
        self._absorbs: list[_Absorb] = []  # orphan spools to append (adopter.py)
        self._done: list[tuple[int, int]] = []  # (seq, messages) stored in the database since the last commit
        self._rows: dict[int, list[int]] = {}  # seq -> [its messages not yet stored, its bytes], for fed rows
        self._finished: list[tuple[int, int]] = []  # (seq, bytes) of rows to delete, kept if a commit fails
        self._forgotten = 0  # messages stored since the last commit, kept if a commit fails
        self._fresh: deque[Fresh] = deque()
        self._fresh_messages = 0
        self._waiting: dict[int, Receipt] = {}  # seq -> its ack=commit request, whose client waits
        self._accepting = True
        self._committing = False  # submits taken off the queue, not yet published
        self._closing = False
        self._next_seq = 1
        self.committed_seq = 0  # every row up to here is on disk (read by the feeder)
        self.recovered = spool.Status(0, 0, 0, 0, None)
        self.messages = 0
        self.bytes = 0
        self.commits = 0
        self.count_commit: Callable[[], None] = _nothing  # the metric, once wired
        self._freed = 0  # bytes of rows deleted since the free pages were last looked at (writer thread)

    def __repr__(self) -> str:
        return f"SpoolWriter({self.path}, messages={self.messages}, bytes={self.bytes})"

    def open(self) -> spool.Status:
        """Open (or create) the file and take stock of what a previous run left in it."""
        self._claim = spool.claim(self.path)
        try:
            self._conn = spool.open_spool(self.path, self.sync)
        except BaseException:
            self.release()
            raise
        self.recovered = spool.status(self._conn)
        self.messages, self.bytes = self.recovered.messages, self.recovered.bytes
        self._next_seq = self.recovered.last_seq + 1
        self.committed_seq = self.recovered.last_seq
        return self.recovered

    # -- the listener's side -----------------------------------------------------------------

    def submit(self, batch: list[Message]) -> Future[None]:
        """Queue a request's messages for the next commit; the future settles once they are on disk."""
        future: Future[None] = Future()
        future.set_running_or_notify_cancel()  # only this thread settles it
        self._queue(batch, future)
        return future

    def submit_on_loop(self, batch: list[Message], future: asyncio.Future[None]) -> None:
        """`submit` for a coroutine: `future` (of the running loop) settles once they are on disk,
        by one callback on its loop for all the requests of the commit. SpoolFull or ShuttingDown
        at once, like `submit`."""
        self._queue(batch, future)

    def _queue(self, batch: list[Message], waiter: Waiter) -> None:
        receipt = batch[0].receipt
        packed = spool.pack([m.text for m in batch], [m.ident or "" for m in batch],
                            receipt.id if receipt is not None else "")
        need = packed.bytes
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("service is shutting down", messages=len(batch))
            if self.bytes + need > self.max_bytes:
                raise SpoolFull(f"spool is full ({self.max_bytes} bytes)", messages=len(batch))
            self.bytes += need
            self.messages += len(batch)
            self._submits.append(_Submit(batch, packed, waiter))
            self._wake.notify()

    def absorb(self, path: Path, found: spool.Status) -> Future[None]:
        """Append an orphan spool's rows (`found`: what it holds) to this one in one transaction;
        the future settles once they are committed here. Never refused for want of room: these
        messages were acknowledged by their dead owner (new requests get 503 until there is room)."""
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("service is shutting down")
            future: Future[None] = Future()
            future.set_running_or_notify_cancel()
            self._absorbs.append((path, found, future))
            self._wake.notify()
        return future

    # -- the consumers' and the feeder's side ------------------------------------------------

    def track(self, rows: list[tuple[int, int, int]]) -> None:
        """The feeder is about to feed these rows, (seq, messages, bytes): each is deleted once
        that many of its messages are forgotten. Before the buffer has them, so before any forget."""
        with self._lock:
            for seq, count, size in rows:
                self._rows[seq] = [count, size]

    def forget(self, batch: list[Message]) -> None:
        """These messages are in the database (stored, duplicate or dead-lettered): when they are
        the last of their request, its row goes with the next commit."""
        counted = Counter([m.seq for m in batch])  # a list is counted in C: faster than a generator
        done = [(seq, count) for seq, count in counted.items() if seq is not None]
        if done:
            with self._lock:
                self._done.extend(done)
                self._wake.notify()

    def take_fresh(self, next_seq: int, max_messages: int) -> tuple[list[Fresh], int]:
        """Committed requests from `next_seq` on as the listener made them, up to `max_messages`
        (at least one); when the next one is not here (read it from the file), none, and the
        first seq that is here (0: none is) so the file is read up to it only."""
        with self._lock:
            fresh = self._fresh
            while fresh and fresh[0].seq < next_seq:
                self._fresh_messages -= len(fresh.popleft().batch)
            taken: list[Fresh] = []
            count = 0
            while fresh and fresh[0].seq == next_seq and (not taken or count + len(fresh[0].batch) <= max_messages):
                row = fresh.popleft()
                self._fresh_messages -= len(row.batch)
                self._waiting.pop(row.seq, None)
                taken.append(row)
                count += len(row.batch)
                next_seq += 1
            return taken, (fresh[0].seq if fresh and not taken else 0)

    def take_waiting(self, seq: int) -> Receipt | None:
        """The ack=commit request a spooled row holds (the very record its client awaits)."""
        with self._lock:
            return self._waiting.pop(seq, None)

    def wait_committed(self, after_seq: int, timeout_s: float) -> int:
        """The last committed seq, once it is past `after_seq` or `timeout_s` has passed."""
        with self._lock:
            if self.committed_seq <= after_seq:
                self._committed.wait(timeout_s)
            return self.committed_seq

    def accepting(self) -> bool:
        with self._lock:
            return self._accepting or bool(self._submits) or bool(self._absorbs) or self._committing

    # -- stopping ----------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """New submits fail with ShuttingDown; the ones already queued are still committed."""
        with self._lock:
            self._accepting = False
            self._wake.notify()
            self._committed.notify_all()

    def close(self) -> None:
        """Commit what is queued, then end the thread (after stop_accepting and the consumers)."""
        with self._lock:
            self._accepting = False
            self._closing = True
            self._wake.notify()

    @property
    def claimed(self) -> bool:
        """Whether this process holds the file's lock (between open and release)."""
        return self._claim is not None

    def release(self) -> None:
        """Let another process have the spool (after the thread has ended, or if it never ran)."""
        if self._claim is not None:
            self._claim.close()
            self._claim = None

    def orphaned_waiting(self) -> list[Receipt]:
        """ack=commit requests whose messages stay in the spool: they must hear that."""
        with self._lock:
            waiting, self._waiting = list(set(self._waiting.values())), {}
            return waiting

    # -- the thread --------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                with self._lock:
                    while (not self._submits and not self._done and not self._finished and not self._absorbs
                           and not self._closing):
                        self._wake.wait()
                    if not self._submits and not self._done and not self._finished and not self._absorbs:
                        return
                    submits, self._submits = self._submits, []
                    self._count_done()
                    finished, self._finished = self._finished, []
                    forgotten, self._forgotten = self._forgotten, 0
                    absorbs, self._absorbs = self._absorbs, []
                    self._committing = bool(submits)
                if submits or finished or forgotten:
                    self._commit(submits, finished, forgotten)
                for path, found, future in absorbs:
                    self._absorb(path, found, future)
        finally:
            self._fail_waiting()
            if self._conn is not None:
                self._conn.close()

    def _count_done(self) -> None:
        """Under the lock: what consumers stored, counted down per row; rows at zero are finished."""
        done, self._done = self._done, []
        for seq, count in done:
            self._forgotten += count
            row = self._rows.get(seq)
            if row is None:
                continue  # not tracked: fed by no one (cannot happen), so not deleted either
            row[0] -= count
            if row[0] <= 0:
                del self._rows[seq]
                self._finished.append((seq, row[1]))

    def _commit(self, submits: list[_Submit], finished: list[tuple[int, int]], forgotten: int) -> None:
        assert self._conn is not None
        rows = []
        waiting: dict[int, Receipt] = {}
        for submit in submits:
            submit.seq = seq = self._next_seq
            self._next_seq += 1
            batch = submit.batch
            for message in batch:
                message.seq = seq
            first = batch[0]
            receipt = first.receipt
            packed = submit.packed
            rows.append((
                seq, first.received_at, int(first.known),
                receipt.id if receipt is not None else None, receipt.accepted if receipt is not None else None,
                receipt.client if receipt is not None else None,
                len(batch), packed.bytes, packed.idents, packed.ident_lengths, packed.texts, packed.text_lengths,
            ))
            if receipt is not None and receipt.future is not None:
                waiting[seq] = receipt
        try:
            self._conn.execute("BEGIN")
            if rows:
                spool.insert(self._conn, rows)
            if finished:
                spool.delete(self._conn, [seq for seq, _ in finished])
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rolled_back(submits, finished, forgotten, exc)
            return
        with self._lock:
            self.commits += 1
            self._waiting.update(waiting)
            for submit in submits:
                if self._fresh_messages + len(submit.batch) <= self._hand_off:
                    self._fresh.append(Fresh(submit.seq, submit.batch, submit.packed.bytes))
                    self._fresh_messages += len(submit.batch)
            if rows:
                self.committed_seq = rows[-1][0]
            self.messages -= forgotten
            freed = sum(size for _, size in finished)
            self.bytes -= freed
            self._committing = False
            self._committed.notify_all()
        self._freed += freed
        empty = self._freed > SHRINK_BYTES and not self.messages
        self.count_commit()
        _settle(submits)
        if empty:
            self._shrink()

    def _shrink(self) -> None:
        """An empty spool: give its free pages back, once they are many (a burst has passed)."""
        assert self._conn is not None
        self._freed = 0
        try:
            free = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
            page = self._conn.execute("PRAGMA page_size").fetchone()[0]
            if free * page > SHRINK_BYTES:
                self._conn.executescript("PRAGMA incremental_vacuum;")  # steps it to the end: execute() frees one page
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("spool %s: could not give free pages back: %s", self.path, exc)

    def _absorb(self, path: Path, found: spool.Status, future: Future[None]) -> None:
        assert self._conn is not None
        try:
            last = absorb(self._conn, path, self._next_seq)
        except (sqlite3.Error, SpoolError) as exc:
            future.set_exception(exc)
            return
        with self._lock:
            self._next_seq = last + 1
            self.committed_seq = last
            self.messages += found.messages
            self.bytes += found.bytes
            self._committed.notify_all()
        future.set_result(None)

    def _rolled_back(
        self, submits: list[_Submit], finished: list[tuple[int, int]], forgotten: int, exc: sqlite3.Error
    ) -> None:
        assert self._conn is not None
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
        log.error("spool %s: commit of %d request(s) failed: %s", self.path, len(submits), exc)
        with self._lock:
            self._committing = False
            self._committed.notify_all()
            self._finished[:0] = finished  # still in the file: delete them with the next commit
            self._forgotten += forgotten
            for submit in submits:
                self.bytes -= submit.packed.bytes
                self.messages -= len(submit.batch)
        _settle(submits, lambda submit: SpoolUnavailable(f"spool write failed: {exc}", messages=len(submit.batch)))

    def _fail_waiting(self) -> None:
        with self._lock:
            submits, self._submits = self._submits, []
            absorbs, self._absorbs = self._absorbs, []
        _settle(submits, lambda submit: ShuttingDown("service is shutting down", messages=len(submit.batch)))
        for _path, _found, pending in absorbs:
            pending.set_exception(ShuttingDown("service is shutting down"))


def _settle(submits: list[_Submit], error: Callable[[_Submit], BaseException] | None = None) -> None:
    """Each submit's outcome (done, or `error` of it): a Future at once; asyncio futures by one
    callback on each loop for all of theirs."""
    on_loops: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], BaseException | None]]] = {}
    for submit in submits:
        outcome = None if error is None else error(submit)
        waiter = submit.waiter
        if isinstance(waiter, Future):
            if outcome is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(outcome)
        else:
            on_loops.setdefault(waiter.get_loop(), []).append((waiter, outcome))
    for loop, settled in on_loops.items():
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody awaits these any more
            loop.call_soon_threadsafe(_settle_on_loop, settled)


def _settle_on_loop(settled: list[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    """On the futures' loop. One whose awaiting handler has gone (cancelled) is left as it is."""
    for future, outcome in settled:
        if future.done():
            continue
        if outcome is None:
            future.set_result(None)
        else:
            future.set_exception(outcome)


def _nothing() -> None:
    pass
