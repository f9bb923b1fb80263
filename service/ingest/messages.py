"""What travels through the buffer: a message, and the acknowledgement a client may wait on."""

from __future__ import annotations

import threading
from concurrent.futures import Future

from ingest.errors import StoreError


class WriteFailed(StoreError):
    """Some messages of an ack=commit request were not stored; the client gets a 5xx."""

    def __init__(self, message: str, stored: int, failed: int) -> None:
        super().__init__(message)
        self.stored = stored
        self.failed = failed
        self.request_id: str | None = None  # set by the handler that reports it


class Ack:
    """Counts down a request's messages; settles one Future when the last is accounted for.

    Created only for ack=commit requests, whose handler awaits `future`: every future has
    exactly one reader. The future is marked running at once so a disconnecting client cannot
    cancel it under a consumer that is about to settle it.
    """

    __slots__ = ("_duplicates", "_failed", "_first_error", "_lock", "_pending", "_stored", "future")

    def __init__(self, count: int) -> None:
        self.future: Future[tuple[int, int]] = Future()  # (stored, duplicates)
        self.future.set_running_or_notify_cancel()
        self._lock = threading.Lock()  # consumers settle parts of one request concurrently
        self._pending = count
        self._stored = 0
        self._duplicates = 0
        self._failed = 0
        self._first_error = ""

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def stored(self, count: int) -> None:
        self._settle(stored=count)

    def duplicate(self, count: int) -> None:
        """Already in the database under the same identity: accounted for, not stored again."""
        self._settle(duplicates=count)

    def failed(self, count: int, error: str) -> None:
        self._settle(failed=count, error=error)

    def _settle(self, *, stored: int = 0, duplicates: int = 0, failed: int = 0, error: str = "") -> None:
        with self._lock:
            if self._pending <= 0:
                # Already settled: a batch handed back by a dying consumer after part of it
                # was stored comes round again. The client has its answer; count nothing twice.
                return
            self._stored += stored
            self._duplicates += duplicates
            self._failed += failed
            if error and not self._first_error:
                self._first_error = error
            self._pending = max(0, self._pending - stored - duplicates - failed)
            done = self._pending == 0
        if not done:
            return
        if self._failed:
            self.future.set_exception(
                WriteFailed(self._first_error, stored=self._stored, failed=self._failed)
            )
        else:
            self.future.set_result((self._stored, self._duplicates))


class Receipt:
    """What became of one request's messages, as far as this process knows (receipts.py).

    Shared by the request's messages; consumers add to it under the ledger's lock. The database
    keeps the same counts in `requests`, written in the transactions that store the messages.
    `fresh`: its id was made by this process, so no row of it is in the database until this
    process writes one (receipt_rows.py may then insert instead of upsert).
    """

    __slots__ = ("accepted", "dead", "fresh", "id", "received_at", "stored")

    def __init__(self, request_id: str, accepted: int, received_at: float, *, fresh: bool = False) -> None:
        self.id = request_id
        self.accepted = accepted
        self.received_at = received_at
        self.fresh = fresh
        self.stored = 0  # in the database, written by this request or (duplicates) an earlier one
        self.dead = 0

    def __repr__(self) -> str:
        return f"Receipt({self.id}, accepted={self.accepted}, stored={self.stored}, dead={self.dead})"


class Message:
    """One accepted message: the JSON text of an object, as received; `received_at` is epoch
    seconds at the listener. Text, not a dict: smaller in the buffer, and never re-encoded.

    `ident` is its identity (identity.py); None when no second copy of it can ever reach the
    store (generated, without a spool), so nothing needs to remember it. `known` is False only
    for an identity no stored row can have yet: the store may then skip the duplicate check.
    `receipt` is its request's (None for rows spooled by an ingest that had no receipts).
    """

    __slots__ = ("ack", "ident", "known", "receipt", "received_at", "seq", "text")

    def __init__(
        self,
        text: str,
        received_at: float,
        ack: Ack | None = None,
        *,
        ident: str | None,
        known: bool = True,
        seq: int | None = None,
        receipt: Receipt | None = None,
    ) -> None:
        self.text = text
        self.received_at = received_at
        self.ack = ack
        self.ident = ident
        self.known = known
        self.seq = seq  # its place in the spool, when there is one: it leaves once stored
        self.receipt = receipt

    def __repr__(self) -> str:
        return f"Message({self.ident}, received_at={self.received_at:.6f}, ack={self.ack is not None})"


def settle_stored(batch: list[Message]) -> None:
    """Tell every waiting client how many of its messages this commit stored."""
    for ack, count in _count_by_ack(batch).items():
        ack.stored(count)


def settle_duplicates(batch: list[Message]) -> None:
    for ack, count in _count_by_ack(batch).items():
        ack.duplicate(count)


def settle_failed_acks(acks: list[Ack], error: str) -> None:
    """Fail requests as a whole: their messages were never handed to a consumer."""
    for ack in acks:
        ack.failed(ack.pending, error)


def settle_failed(batch: list[Message], error: str) -> None:
    for ack, count in _count_by_ack(batch).items():
        ack.failed(count, error)


def _count_by_ack(batch: list[Message]) -> dict[Ack, int]:
    counts: dict[Ack, int] = {}
    for message in batch:
        if message.ack is not None:
            counts[message.ack] = counts.get(message.ack, 0) + 1
    return counts
