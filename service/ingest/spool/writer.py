"""The spool writer thread: group commit of accepted requests to the spool file.

One more producer-consumer stage. Listener handlers `submit` a request's messages and await the
returned future; this thread takes every request that is waiting, writes them all (and deletes the
rows consumers have stored since) in one transaction, commits once (an fsync with sync=full), then
settles their futures: the handlers answer 202. Under load, many requests share one fsync.

The spool is bounded in bytes: a submit that would pass `max_bytes` is refused at once (503).
Error policy: a failed commit (a full disk, an I/O error) fails the requests it held with
SpoolUnavailable (503, the client retries) and gives the deletions back for the next commit; the
thread carries on. Anything else is logged and ends the thread; the service notices and stops.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import IO

from ingest.errors import ShuttingDown, SpoolError, SpoolFull, SpoolUnavailable
from ingest.messages import Message, Receipt
from ingest.spool import file as spool
from ingest.spool.absorb import absorb

log = logging.getLogger(__name__)

# What a waiting ack=commit client hears when its messages outlast a shutdown in the spool.
KEPT_IN_SPOOL = "not stored before shutdown; kept in the spool for the next start"
_INSERT = (
    "INSERT INTO spool (seq, ident, known, received_at, payload, request, accepted, client) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_DELETE = "DELETE FROM spool WHERE seq = ?"

_Submit = tuple[list[Message], int, "Future[None]"]
_Absorb = tuple[Path, spool.Status, "Future[None]"]


class SpoolWriter(threading.Thread):
    """Non-daemon: requests it holds have not been answered yet, and deletions not written."""

    def __init__(self, path: Path, *, sync: str, max_bytes: int) -> None:
        super().__init__(name="spool-writer", daemon=False)
        self.path = path
        self.sync = sync
        self.max_bytes = max_bytes
        self._conn: sqlite3.Connection | None = None
        self._claim: IO[bytes] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # submits or deletions are waiting
        self._committed = threading.Condition(self._lock)  # committed_seq moved on
        self._submits: list[_Submit] = []
        self._absorbs: list[_Absorb] = []  # orphan spools to append (adopter.py)
        self._done: list[tuple[int, int]] = []  # (seq, bytes) stored in the database
        self._waiting: dict[int, Receipt] = {}  # seq -> its ack=commit request, whose client waits
        self._accepting = True
        self._committing = False  # submits taken off the queue, not yet published
        self._closing = False
        self._next_seq = 1
        self.committed_seq = 0  # every row up to here is on disk (read by the feeder)
        self.recovered = spool.Status(0, 0, 0, 0, None)
        self.messages = 0
        self.bytes = 0

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
        need = sum(_row_bytes(m) for m in batch)
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("service is shutting down", messages=len(batch))
            if self.bytes + need > self.max_bytes:
                raise SpoolFull(f"spool is full ({self.max_bytes} bytes)", messages=len(batch))
            self.bytes += need
            self.messages += len(batch)
            future: Future[None] = Future()
            future.set_running_or_notify_cancel()  # only this thread settles it
            self._submits.append((batch, need, future))
            self._wake.notify()
        return future

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

    def forget(self, batch: list[Message]) -> None:
        """These messages are in the database (stored, duplicate or dead-lettered): delete them."""
        done = [(m.seq, _row_bytes(m)) for m in batch if m.seq is not None]
        if done:
            with self._lock:
                self._done.extend(done)
                self._wake.notify()

    def take_waiting(self, seq: int) -> Receipt | None:
        """The ack=commit request a spooled message belongs to (the very record its client awaits)."""
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
                    while not self._submits and not self._done and not self._absorbs and not self._closing:
                        self._wake.wait()
                    if not self._submits and not self._done and not self._absorbs:
                        return
                    submits, self._submits = self._submits, []
                    done, self._done = self._done, []
                    absorbs, self._absorbs = self._absorbs, []
                    self._committing = bool(submits) or bool(absorbs)
                if submits or done:
                    self._commit(submits, done)
                for path, found, future in absorbs:
                    self._absorb(path, found, future)
        finally:
            self._fail_waiting()
            if self._conn is not None:
                self._conn.close()

    def _commit(self, submits: list[_Submit], done: list[tuple[int, int]]) -> None:
        assert self._conn is not None
        rows = []
        waiting: dict[int, Receipt] = {}
        for batch, _need, _future in submits:
            for message in batch:
                message.seq = self._next_seq
                self._next_seq += 1
                receipt = message.receipt
                rows.append((
                    message.seq, message.ident, int(message.known), message.received_at, message.text,
                    receipt.id if receipt is not None else None, receipt.accepted if receipt is not None else None,
                    receipt.client if receipt is not None else None,
                ))
                if receipt is not None and receipt.future is not None:
                    waiting[message.seq] = receipt
        try:
            self._conn.execute("BEGIN")
            if rows:
                self._conn.executemany(_INSERT, rows)
            if done:
                self._conn.executemany(_DELETE, [(seq,) for seq, _ in done])
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rolled_back(submits, done, exc)
            return
        with self._lock:
            self._waiting.update(waiting)
            if rows:
                self.committed_seq = rows[-1][0]
            self.messages -= len(done)
            self.bytes -= sum(size for _, size in done)
            self._committing = False
            self._committed.notify_all()
        for _batch, _need, future in submits:
            future.set_result(None)

    def _absorb(self, path: Path, found: spool.Status, future: Future[None]) -> None:
        assert self._conn is not None
        try:
            last = absorb(self._conn, path, self._next_seq)
        except (sqlite3.Error, SpoolError) as exc:
            with self._lock:
                self._committing = False
                self._committed.notify_all()
            future.set_exception(exc)
            return
        with self._lock:
            self._next_seq = last + 1
            self.committed_seq = last
            self.messages += found.messages
            self.bytes += found.bytes
            self._committing = False
            self._committed.notify_all()
        future.set_result(None)

    def _rolled_back(self, submits: list[_Submit], done: list[tuple[int, int]], exc: sqlite3.Error) -> None:
        assert self._conn is not None
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
        log.error("spool %s: commit of %d request(s) failed: %s", self.path, len(submits), exc)
        with self._lock:
            self._committing = False
            self._committed.notify_all()
            self._done[:0] = done  # still in the file: delete them with the next commit
            for batch, need, _future in submits:
                self.bytes -= need
                self.messages -= len(batch)
        for batch, _need, future in submits:
            future.set_exception(SpoolUnavailable(f"spool write failed: {exc}", messages=len(batch)))

    def _fail_waiting(self) -> None:
        with self._lock:
            submits, self._submits = self._submits, []
            absorbs, self._absorbs = self._absorbs, []
        for batch, _need, future in submits:
            future.set_exception(ShuttingDown("service is shutting down", messages=len(batch)))
        for _path, _found, pending in absorbs:
            pending.set_exception(ShuttingDown("service is shutting down"))


def _row_bytes(message: Message) -> int:
    request = message.receipt.id if message.receipt is not None else ""
    return spool.row_bytes(message.text, message.ident or "", request)
