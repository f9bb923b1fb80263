"""Receipts: what became of an accepted request, asked for by its id.

Every accepted request gets an id (the client's `X-Request-Id` when it is of sane form). The
lasting answer is in the database: the store writes a request's counts to `requests` in the same
transaction as its messages, so any replica on that database can answer `GET /requests/{id}`
once something of the request has committed. Until then only the process that accepted it knows
the request: the `Ledger` holds the requests in flight here, so that process can answer for
them before their first commit and while the database does not answer.
"""

from __future__ import annotations

import itertools
import re
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ingest.messages import CommitTimeout, Message, Receipt, by_request

REQUEST_ID_HEADER = "X-Request-Id"
# Safe in a URL path, a header and a JSON string without escaping: what request ids look like
# (UUIDs, ULIDs, trace ids).
_SANE_ID = re.compile(r"[A-Za-z0-9._~:-]{1,128}")


@dataclass(frozen=True)
class Counts:
    accepted: int
    stored: int
    dead_lettered: int

    @classmethod
    def of(cls, accepted: int, stored: int, dead_lettered: int) -> Counts:
        # A spooled batch written again after a crash between the commit and the spool's
        # delete counts its messages twice; no request has more in the database than it sent.
        return cls(accepted, min(stored, max(0, accepted - dead_lettered)), dead_lettered)

    @property
    def pending(self) -> int:
        return max(0, self.accepted - self.stored - self.dead_lettered)

    def as_json(self, request_id: str) -> dict[str, object]:
        return {
            "request": request_id, "accepted": self.accepted, "stored": self.stored,
            "dead_lettered": self.dead_lettered, "pending": self.pending,
        }


def is_sane(request_id: str) -> bool:
    return _SANE_ID.fullmatch(request_id) is not None


def may_read(owner: str | None, client: str | None) -> bool:
    """Whether `client` (None without tokens) may read a receipt `owner` sent: a receipt with an
    owner is its owner's alone, with tokens; one without (sent without tokens, or before
    receipts had owners) anyone's who may push."""
    return client is None or owner is None or owner == client


class Ledger:
    """The requests in flight in this process: accepted, not yet all stored or dead-lettered.

    Bounded by what is in flight (the buffer, or the spool): an entry leaves when its last
    message is in the database or dead-lettered, or when its request was not accepted after all.
    Every outcome of every request (in the ledger or not: rows a previous run left in the spool)
    is counted here, under one lock, once a batch: `committed` after a commit, `given_up` for
    messages that will not be stored by this process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the listener opens entries, consumers settle them
        self._open: dict[str, Receipt] = {}
        self._prefix = f"{uuid.uuid4().hex[:12]}-"
        self._counter = itertools.count(1)

    def __repr__(self) -> str:
        return f"Ledger(in_flight={len(self._open)})"

    def __len__(self) -> int:
        return len(self._open)

    def open(
        self, sent: str | None, accepted: int, received_at: float, *, waited_on: bool = False, client: str | None = None
    ) -> Receipt:
        """A receipt for a request about to be enqueued, under the client's id if it sent one of
        sane form, else a new one (unique without coordination); withdraw() it if that fails.

        An id already in flight (a client reusing its ids) is answered for by the newest request
        here; in the database the counts of all requests sent under one id add up. `waited_on`:
        its client awaits the commit (ack=commit), on the receipt's future. `client`: its owner,
        with tokens (see may_read).
        """
        if sent is not None and _SANE_ID.fullmatch(sent):
            receipt = Receipt(sent, accepted, received_at, waited_on=waited_on, client=client)
        else:
            request_id = f"{self._prefix}{next(self._counter):x}"
            receipt = Receipt(request_id, accepted, received_at, fresh=True, waited_on=waited_on, client=client)
        with self._lock:
            self._open[receipt.id] = receipt
        return receipt

    def withdraw(self, receipt: Receipt) -> None:
        """The request was refused (queue or spool full, shutting down): nothing of it will come."""
        with self._lock:
            if self._open.get(receipt.id) is receipt:
                del self._open[receipt.id]

    def get(self, request_id: str) -> Receipt | None:
        with self._lock:
            return self._open.get(request_id)

    def lookup(self, request_id: str, client: str | None = None) -> Counts | None:
        """Its counts so far, if it is in flight here and `client` may read it (may_read)."""
        with self._lock:
            receipt = self._open.get(request_id)
            if receipt is None or not may_read(receipt.client, client):
                return None
            return Counts.of(receipt.accepted, receipt.in_database, receipt.dead)

    def committed(
        self, stored: Sequence[Message], duplicates: Sequence[Message], dead: Sequence[tuple[Message, str]]
    ) -> None:
        """A batch is in the database: its messages stored, found stored already, or dead-lettered."""
        errors = {m.receipt: f"refused by the database: {error}" for m, error in reversed(dead)}
        with self._lock:
            for receipt, n in by_request(stored).items():
                receipt.count(stored=n)
            for receipt, n in by_request(duplicates).items():
                receipt.count(duplicates=n)
            for receipt, n in by_request(m for m, _ in dead).items():
                receipt.count(dead=n, error=errors[receipt])
            self._settle({m.receipt for group in (stored, duplicates) for m in group} | set(errors))

    def given_up(self, messages: Sequence[Message], error: str) -> None:
        """These messages will not be stored by this process (their clients hear `error`)."""
        with self._lock:
            counts = by_request(messages)
            for receipt, n in counts.items():
                receipt.count(unstored=n, error=error)
            self._settle(set(counts))

    def reported(self, request_id: str, received_at: float, *, stored: int, duplicates: int, dead: int,
                 error: str = "") -> None:
        """A writer of another process committed this request (a stream buffer's ack=commit)."""
        with self._lock:
            receipt = self._open.get(request_id)
            if receipt is None or receipt.received_at != received_at:
                return  # settled here already, or another request under the same id
            receipt.count(stored=stored, duplicates=duplicates, dead=dead, error=error)
            self._settle([receipt])

    def expire(self, receipt: Receipt, error: str) -> None:
        """Stop waiting for a report of its commit: its client hears CommitTimeout."""
        with self._lock:
            future = receipt.future
            if future is not None and not future.done():
                future.set_exception(CommitTimeout(error, stored=receipt.in_database, failed=0))
            if self._open.get(receipt.id) is receipt:
                del self._open[receipt.id]

    def give_up_requests(self, receipts: Iterable[Receipt], error: str) -> None:
        """Whole requests whose messages were never handed to a consumer (left in the spool)."""
        with self._lock:
            whole = set(receipts)
            for receipt in whole:
                receipt.count(unstored=receipt.pending, error=error)
            self._settle(whole)

    def _settle(self, receipts: Iterable[Receipt | None]) -> None:
        """Answer waiting clients; let go of requests whose every message is in the database."""
        for receipt in receipts:
            if receipt is None:
                continue
            receipt.settle_future()
            if receipt.in_database + receipt.dead >= receipt.accepted and self._open.get(receipt.id) is receipt:
                del self._open[receipt.id]
