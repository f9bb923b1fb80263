"""Writing batches: one transaction a batch, errors classified by class, nothing dropped.

- Transient errors (connection lost, serialization failure, database locked) are retried with
  capped exponential backoff and full jitter, for as long as it takes, until the drain deadline.
- Permanent errors (the database refuses some message) are isolated by splitting the batch in
  halves; the refused messages go to `dead_letters` with their error, the rest are stored.
- Anything else is not ours to judge: it propagates to the consumer's error policy.

Each message has an identity (identity.py) under a unique index. A batch of identities never
seen before takes the fast path (a plain COPY or executemany). Any other batch, or a fast batch
the database refused, goes through the duplicate-skipping path, which stores only identities not
stored yet and reports which were: a retried request or a batch written twice stores nothing twice.
Both paths write rows the way message_rows.py does; this module decides which, and what next.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Connection

from ingest.db import receipt_rows
from ingest.db.message_rows import copy_messages, insert_messages, insert_unless_stored
from ingest.db.pool import ConnectionPool
from ingest.db.tables import dead_letters
from ingest.errors import PermanentStoreError, StartupError, TransientStoreError, first_line
from ingest.messages import Message
from ingest.metrics import Metrics

log = logging.getLogger(__name__)

_PERMANENT = (psycopg.DataError, psycopg.IntegrityError, sqlite3.DataError, sqlite3.IntegrityError)
_TRANSIENT = (
    psycopg.OperationalError,  # connection lost, admin shutdown, serialization failure, deadlock
    psycopg.InterfaceError,  # the connection is closed
    sqlite3.OperationalError,  # database is locked, disk I/O error
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,  # SQLAlchemy's pool could not hand out a connection in time
)


def classify(exc: BaseException) -> type[TransientStoreError] | type[PermanentStoreError] | None:
    """Map a driver error to transient or permanent by its class; None if it is not a DB error."""
    # SQLAlchemy wraps driver errors (and errors raised while binding parameters) in
    # StatementError; the class that tells what happened is the wrapped one.
    original = exc.orig if isinstance(exc, sa_exc.StatementError) and exc.orig is not None else exc
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return TransientStoreError
    if isinstance(original, _PERMANENT):
        return PermanentStoreError
    if isinstance(original, _TRANSIENT) or isinstance(exc, _TRANSIENT):
        return TransientStoreError
    if isinstance(original, psycopg.Error | sqlite3.Error) or isinstance(exc, sa_exc.DBAPIError):
        # A database error of no known kind (a missing table, a full disk): retrying keeps the
        # data safe while someone fixes the database; dead-lettering would blame the message.
        return TransientStoreError
    return None


# An insert writes the batch in the caller's transaction and returns the identities it stored,
# or None when it stored them all.
Insert = Callable[[Connection, list[Message]], "set[str | None] | None"]


@dataclass
class WriteResult:
    stored: list[Message] = field(default_factory=list)
    duplicates: list[Message] = field(default_factory=list)
    dead: list[tuple[Message, str]] = field(default_factory=list)


class Backoff:
    """Capped exponential backoff with full jitter: delay = uniform(0, min(cap, base * 2**n))."""

    def __init__(self, base_s: float = 0.05, cap_s: float = 5.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s

    def delay_s(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap_s, self.base_s * 2 ** min(attempt, 30)))


class Store:
    def __init__(
        self,
        pool: ConnectionPool,
        metrics: Metrics,
        hard_stop: threading.Event,
        backoff: Backoff | None = None,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._hard_stop = hard_stop
        self._backoff = backoff or Backoff()
        postgres = pool.dialect == "postgresql"
        self._insert_new = _with_receipts(copy_messages if postgres else insert_messages, fresh=True)
        self._insert_skipping = _with_receipts(insert_unless_stored)
        # The last word from the database, of a write or of the probe (chores.py): None when it
        # answered, else what went wrong. /readyz reads it.
        self.database_error: str | None = None

    def __repr__(self) -> str:
        return f"Store({self._pool!r}, database_error={self.database_error!r})"

    def check(self) -> None:
        """Connect; each consumer calls this before the service opens (the service checked the
        schema first: migrate.check_at_head)."""
        try:
            self._pool.ping()
        except sa_exc.SQLAlchemyError as exc:
            raise StartupError(f"cannot connect to the database: {first_line(exc)}") from None

    def count_dead_letters(self) -> int:
        """Dead letters waiting, of every replica: the database is the only place that knows."""
        with self._pool.connection() as conn:
            return int(conn.execute(select(func.count()).select_from(dead_letters)).scalar_one())

    def write(self, batch: list[Message]) -> WriteResult:
        """Store the batch; refused messages come back in `dead` after being dead-lettered.

        Raises TransientStoreError only when the drain deadline stops the retries.
        """
        result = WriteResult()
        if not any(m.known for m in batch):
            try:
                self._retrying(self._insert_new, batch)
                result.stored.extend(batch)
                return result
            except PermanentStoreError:
                pass  # maybe a duplicate after all (a batch handed back): the careful path decides
        self._write_isolating(batch, result)
        return result

    def _write_isolating(self, batch: list[Message], result: WriteResult) -> None:
        try:
            inserted = self._retrying(self._insert_skipping, batch)
        except PermanentStoreError as exc:
            if len(batch) == 1:
                self._dead_letter(batch[0], str(exc))
                result.dead.append((batch[0], str(exc)))
                return
            middle = len(batch) // 2
            self._write_isolating(batch[:middle], result)
            self._write_isolating(batch[middle:], result)
            return
        _sort_out(batch, inserted, result)

    def _retrying(self, insert_fn: Insert, batch: list[Message]) -> set[str | None] | None:
        attempt = 0
        while True:
            try:
                started = time.perf_counter()
                with self._pool.connection() as conn:
                    inserted = self._in_transaction(conn, insert_fn, batch)
                self._metrics.db_write_seconds.observe(time.perf_counter() - started)
                self.database_error = None
                return inserted
            except Exception as exc:
                kind = classify(exc)
                if kind is None:
                    raise
                if kind is PermanentStoreError:
                    raise PermanentStoreError(first_line(exc)) from exc
                self.database_error = first_line(exc)
                delay = self._backoff.delay_s(attempt)
                attempt += 1
                self._metrics.db_retries.inc()
                log.warning(
                    "write of %d message(s) failed (attempt %d), retrying in %.2fs: %s",
                    len(batch), attempt, delay, first_line(exc),
                )
                if self._hard_stop.wait(delay):
                    raise TransientStoreError(f"drain deadline passed while retrying: {first_line(exc)}") from exc

    @staticmethod
    def _in_transaction(conn: Connection, insert_fn: Insert, batch: list[Message]) -> set[str | None] | None:
        try:
            with conn.begin():
                return insert_fn(conn, batch)
        except Exception as exc:
            if classify(exc) is TransientStoreError:
                # COPY runs on the driver's connection, so SQLAlchemy may not know it broke:
                # never hand this connection out again.
                conn.invalidate()
            raise

    def _dead_letter(self, message: Message, error: str) -> None:
        lettered_already = False

        def insert_dead(conn: Connection, batch: list[Message]) -> None:
            nonlocal lettered_already
            lettered_already = _lettered_already(conn, batch[0])
            if not lettered_already:
                conn.execute(insert(dead_letters), [
                    {"received_at": _utc(m.received_at), "payload": m.text, "error": error, "ident": m.ident,
                     "request": m.receipt.id if m.receipt is not None else None,
                     "client": m.receipt.client if m.receipt is not None else None}
                    for m in batch
                ])
                receipt_rows.write(conn, batch, dead=True)
            return None

        self._retrying(insert_dead, [message])
        if lettered_already:
            log.warning("message refused again, its request written again; its dead letter stands: %s", error)
            return
        self._metrics.dead_lettered.inc()
        log.error("message dead-lettered: %s", error)


def _lettered_already(conn: Connection, message: Message) -> bool:
    """Whether this message of this request has a letter: the request is being written again (a
    stream's request delivered again, a spool's row fed again after a crash), and its first
    writing dead-lettered the message and counted it in the receipt. Another request with the
    same identity (a client's retry under a new id) gets a letter of its own, which a replay
    moves into that request's receipt."""
    if message.ident is None:
        return False
    request = message.receipt.id if message.receipt is not None else None
    same_request = dead_letters.c.request.is_(None) if request is None else dead_letters.c.request == request
    found = conn.execute(
        select(dead_letters.c.id).where(dead_letters.c.ident == message.ident, same_request).limit(1)
    ).first()
    return found is not None


def _with_receipts(insert_fn: Insert, *, fresh: bool = False) -> Insert:
    """The insert, then its requests' receipts, in the same transaction. `fresh`: the fast path,
    whose failure on a key (a receipt row there after all) sends the batch the careful way."""

    def insert_and_count(conn: Connection, batch: list[Message]) -> set[str | None] | None:
        inserted = insert_fn(conn, batch)
        # Stored or a duplicate, each message is in the database now.
        receipt_rows.write(conn, batch, fresh=fresh)
        return inserted

    return insert_and_count


def _sort_out(batch: list[Message], inserted: set[str | None] | None, result: WriteResult) -> None:
    """Stored or duplicate, by identity; of two messages with one identity, the first is stored."""
    if inserted is None:
        result.stored.extend(batch)
        return
    for message in batch:
        if message.ident is None:
            result.stored.append(message)  # no identity: nothing to conflict with
        elif message.ident in inserted:
            inserted.discard(message.ident)
            result.stored.append(message)
        else:
            result.duplicates.append(message)


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)
