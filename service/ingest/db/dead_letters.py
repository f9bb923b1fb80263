"""`ingest dead-letters`: list, replay and purge the messages the database refused.

A replay moves one letter at a time, each in its own transaction: the letter is deleted first
(so two replays at once cannot both take it), then its message is inserted unless its identity
is already stored, then its request's receipt moves it from dead-lettered to stored. A letter the
database refuses again stays, with the new error. Functions here return data; ingest.cli.database prints.

A letter names its client in a column of its own (0004), not through a join with `requests` on
its request id: receipts are purged on their own schedule (`ingest requests purge`), and a
request id another client reused names that receipt's first client, not the letter's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, true, update
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.sql.elements import ColumnElement

from ingest.db import receipt_rows
from ingest.db.message_rows import insert_unless_stored
from ingest.db.store import classify
from ingest.db.tables import dead_letters
from ingest.errors import PermanentStoreError, TransientStoreError, first_line
from ingest.messages import Message

WHEN_FORMS = (
    "an ISO 8601 date or datetime (naive = UTC), e.g. 2026-11-27 or 2026-11-27T08:00:00Z, "
    "or a duration ago: 30s, 15m, 2h, 7d"
)
_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
# What this module reads and writes; a database missing any of it is not at head.
def parse_when(value: str, now: datetime) -> datetime:
    """An aware UTC moment from an ISO 8601 date/datetime (naive = UTC) or a duration before `now`."""
    value = value.strip()
    duration = _DURATION.fullmatch(value)
    if duration:
        return now - timedelta(**{_UNITS[duration[2]]: int(duration[1])})
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a time: give {WHEN_FORMS}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes (UTC, as SQLAlchemy wrote them); Postgres aware ones."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True)
class Letter:
    id: int
    received_at: datetime
    failed_at: datetime
    payload: str
    error: str
    ident: str | None
    request: str | None
    client: str | None  # with --auth-tokens, the client that sent it

    @classmethod
    def from_row(cls, row: Row[Any]) -> Letter:
        return cls(
            id=row.id,
            received_at=utc(row.received_at),
            failed_at=utc(row.failed_at),
            payload=row.payload,
            error=row.error,
            ident=row.ident,
            request=row.request,
            client=row.client,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "received_at": self.received_at.isoformat(),
            "failed_at": self.failed_at.isoformat(),
            "payload": self.payload,
            "error": self.error,
            "ident": self.ident,
            "request": self.request,
            "client": self.client,
        }


@dataclass(frozen=True)
class Page:
    letters: list[Letter]
    more: int  # letters that matched but lie past the limit

    def table(self) -> list[str]:
        """A compact table, error and payload shortened to one line each, and a count line."""
        lines = [_ROW.format("id", "failed_at (UTC)", "request", "client", "error", "payload")] if self.letters else []
        for letter in self.letters:
            lines.append(
                _ROW.format(
                    letter.id,
                    letter.failed_at.strftime("%Y-%m-%d %H:%M:%S"),
                    _shorten(letter.request or "-", 16),
                    _shorten(letter.client or "-", 16),
                    _shorten(letter.error, 40),
                    _shorten(letter.payload, 48),
                )
            )
        count = f"{len(self.letters)} dead letter(s)"
        lines.append(f"{count} ... and {self.more} more; use --limit" if self.more else count)
        return lines


_ROW = "{:>8}  {:19}  {:16}  {:16}  {:40}  {}"


def _shorten(value: str, width: int) -> str:
    one_line = " ".join(value.split())
    return one_line if len(one_line) <= width else one_line[: width - 3] + "..."


@dataclass
class ReplayResult:
    stored: int = 0
    already_stored: int = 0  # its identity was in messages already: the letter just leaves
    refused: list[tuple[int, str]] = field(default_factory=list)  # (id, new error): still letters
    not_found: list[int] = field(default_factory=list)  # gone already (replayed, purged, never there)
    stopped: str | None = None  # a transient error ended the replay here; what is done stays done

    @property
    def replayed(self) -> int:
        return self.stored + self.already_stored + len(self.refused)


def list_letters(engine: Engine, *, since: datetime | None = None, limit: int = 100) -> Page:
    """Letters that failed at or after `since`, oldest first, at most `limit` of them."""
    where = _failed_since(since)
    with engine.connect() as conn:
        rows = conn.execute(
            select(dead_letters).where(where).order_by(dead_letters.c.failed_at, dead_letters.c.id).limit(limit)
        ).all()
        total = conn.execute(select(func.count()).select_from(dead_letters).where(where)).scalar_one()
    return Page([Letter.from_row(r) for r in rows], more=max(0, total - len(rows)))


def select_ids(engine: Engine, *, since: datetime | None = None) -> list[int]:
    """Ids of letters that failed at or after `since` (every letter without it), oldest first."""
    with engine.connect() as conn:
        return list(
            conn.execute(select(dead_letters.c.id).where(_failed_since(since)).order_by(dead_letters.c.id)).scalars()
        )


def replay(engine: Engine, ids: list[int]) -> ReplayResult:
    """Re-submit each letter to messages, one transaction a letter; see the module docstring."""
    result = ReplayResult()
    for letter_id in ids:
        try:
            _replay_one(engine, letter_id, result)
        except Exception as exc:
            if classify(exc) is not TransientStoreError:
                raise
            result.stopped = first_line(exc)
            break
    return result


def _replay_one(engine: Engine, letter_id: int, result: ReplayResult) -> None:
    try:
        with engine.begin() as conn:
            letter = conn.execute(
                delete(dead_letters).where(dead_letters.c.id == letter_id).returning(*dead_letters.c)
            ).first()
            if letter is None:
                result.not_found.append(letter_id)
                return
            stored = _insert_message(conn, letter)
            if letter.request is not None:
                receipt_rows.move_to_stored(conn, letter.request)
    except Exception as exc:
        if classify(exc) is not PermanentStoreError:
            raise
        error = first_line(exc)
        # The transaction above rolled back, so the letter is still there: give it the new error.
        with engine.begin() as conn:
            conn.execute(update(dead_letters).where(dead_letters.c.id == letter_id).values(error=error))
        result.refused.append((letter_id, error))
        return
    if stored:
        result.stored += 1
    else:
        result.already_stored += 1


def _insert_message(conn: Connection, letter: Row[Any]) -> bool:
    """Insert unless the identity is stored (the store's own way); True when a row was written."""
    message = Message(letter.payload, utc(letter.received_at).timestamp(), ident=letter.ident)
    return bool(insert_unless_stored(conn, [message]))


def count_before(engine: Engine, before: datetime) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(dead_letters).where(_failed_before(before))).scalar_one()


def purge(engine: Engine, before: datetime) -> int:
    """Delete the letters that failed before `before`; returns how many went."""
    with engine.begin() as conn:
        return conn.execute(delete(dead_letters).where(_failed_before(before))).rowcount


def _failed_since(since: datetime | None) -> ColumnElement[bool]:
    # Bound as UTC: SQLite stores the naive UTC text and compares text, ignoring any offset.
    return dead_letters.c.failed_at >= utc(since) if since is not None else true()


def _failed_before(before: datetime) -> ColumnElement[bool]:
    return dead_letters.c.failed_at < utc(before)
