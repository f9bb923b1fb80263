"""What travels through the buffer: a message, and the record of the request it came in."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future

from ingest.errors import StoreError


class WriteFailed(StoreError):
    """Some messages of an ack=commit request were not stored; the client gets a 5xx."""

    def __init__(self, message: str, stored: int, failed: int) -> None:
        super().__init__(message)
        self.stored = stored
        self.failed = failed
        self.request_id: str | None = None  # set by the handler that reports it


class CommitTimeout(WriteFailed):
    """An ack=commit request published to the stream whose commit no writer reported in time:
    504; its messages are in the stream and will be stored, and its receipt tells when."""


class Receipt:
    """One accepted request: what became of its messages, and the future its client awaits.

    The one record of a request's outcome. Consumers count a batch into it once, through the
    Ledger (receipts.py), under the ledger's lock: `stored` (written by this request),
    `duplicates` (its identity was stored already: in the database all the same), `dead`
    (refused, dead-lettered) and `unstored` (given up on: the drain deadline, or kept in the
    spool for the next start). `future` exists for ack=commit requests only and is settled once
    nothing is pending: the 201's counts, or WriteFailed. It is marked running at once so a
    disconnecting client cannot cancel it under a consumer that is about to settle it.
    `fresh`: its id was made by this process, so no row of it is in the database until this
    process writes one (receipt_rows.py may then insert instead of upsert). `client`: with
    --auth-tokens, the name of the client that sent it, the only one that may read it.
    """

    __slots__ = (
        "accepted", "client", "dead", "duplicates", "first_error", "fresh", "future", "id", "received_at", "stored",
        "unstored",
    )

    def __init__(
        self, request_id: str, accepted: int, received_at: float, *, fresh: bool = False, waited_on: bool = False,
        client: str | None = None,
    ) -> None:
        self.id = request_id
        self.client = client
        self.accepted = accepted
        self.received_at = received_at
        self.fresh = fresh
        self.stored = 0
        self.duplicates = 0
        self.dead = 0
        self.unstored = 0
        self.first_error = ""
        self.future: Future[tuple[int, int]] | None = None  # (stored, duplicates), for ack=commit
        if waited_on:
            self.future = Future()
            self.future.set_running_or_notify_cancel()

    def __repr__(self) -> str:
        return (f"Receipt({self.id}, accepted={self.accepted}, stored={self.stored}, "
                f"duplicates={self.duplicates}, dead={self.dead}, unstored={self.unstored})")

    @property
    def pending(self) -> int:
        return self.accepted - self.stored - self.duplicates - self.dead - self.unstored

    @property
    def in_database(self) -> int:
        """Its messages the database holds, written by it or (duplicates) by an earlier request."""
        return self.stored + self.duplicates

    def count(self, *, stored: int = 0, duplicates: int = 0, dead: int = 0, unstored: int = 0, error: str = "") -> None:
        """Add an outcome; the caller holds the ledger's lock. Never past what is pending: a batch
        that comes round again (handed back by a dying consumer) is counted once."""
        stored = min(stored, self.pending)
        self.stored += stored
        duplicates = min(duplicates, self.pending)
        self.duplicates += duplicates
        dead = min(dead, self.pending)
        self.dead += dead
        unstored = min(unstored, self.pending)
        self.unstored += unstored
        if error and (dead or unstored) and not self.first_error:
            self.first_error = error

    def settle_future(self) -> None:
        """Tell the waiting client, once nothing is pending; idempotent, under the ledger's lock."""
        future = self.future
        if future is None or self.pending > 0 or future.done():
            return
        failed = self.dead + self.unstored
        if failed:
            future.set_exception(WriteFailed(self.first_error, stored=self.stored, failed=failed))
        else:
            future.set_result((self.stored, self.duplicates))


class Message:
    """One accepted message: the JSON text of an object, as received; `received_at` is epoch
    seconds at the listener. Text, not a dict: smaller in the buffer, and never re-encoded.

    `ident` is its identity (identity.py); None when no second copy of it can ever reach the
    store (generated, without a spool), so nothing needs to remember it. `known` is False only
    for an identity no stored row can have yet: the store may then skip the duplicate check.
    `receipt` is its request's (None for rows spooled by an ingest that had no receipts).
    """

    __slots__ = ("ident", "known", "receipt", "received_at", "seq", "text")

    # Positional or keyword: a positional call costs half (about 180 against 350 ns in CPython
    # 3.11), which counts where messages are made by the thousand (the spool feeder).
    def __init__(
        self,
        text: str,
        received_at: float,
        ident: str | None,
        known: bool = True,
        seq: int | None = None,
        receipt: Receipt | None = None,
    ) -> None:
        self.text = text
        self.received_at = received_at
        self.ident = ident
        self.known = known
        self.seq = seq  # its place in the spool, when there is one: it leaves once stored
        self.receipt = receipt

    def __repr__(self) -> str:
        return f"Message({self.ident}, received_at={self.received_at:.6f}, request={self.request_id})"

    @property
    def request_id(self) -> str | None:
        return self.receipt.id if self.receipt is not None else None


def by_request(messages: Iterable[Message]) -> dict[Receipt, int]:
    """How many of these messages each request has: the one grouping of a batch by request."""
    counts: dict[Receipt, int] = {}
    for message in messages:
        receipt = message.receipt
        if receipt is not None:
            counts[receipt] = counts.get(receipt, 0) + 1
    return counts
