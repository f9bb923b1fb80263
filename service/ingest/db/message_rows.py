"""The `messages` table's rows going in: the SQL, and the COPY text it is fed.

The store (store.py) decides what to write and what to do when the database refuses; this is
how the rows physically get there, kept apart so the tuned hot path reads on its own. Every
function writes in the caller's transaction and leaves errors to the store:
- the fast path, for identities never seen: `copy_messages` (Postgres COPY) or
  `insert_messages` (SQLite executemany);
- the careful path, `insert_unless_stored`, which skips identities already stored and returns
  the ones it stored (the store's retries and halving, a dead letter's replay).
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy.engine import Connection

from ingest.db.tables import messages, stamps
from ingest.messages import Message

# The conflict target names the partial index's predicate, or neither database would match it.
_ON_CONFLICT = "ON CONFLICT (ident) WHERE ident IS NOT NULL DO NOTHING RETURNING ident"
_INSERT_SQLITE = f"INSERT INTO {messages.name} (received_at, payload, ident) VALUES (?, ?, ?)"
_INSERT_SQLITE_SKIPPING = f"{_INSERT_SQLITE} {_ON_CONFLICT}"
_COPY_POSTGRES = f"COPY {messages.name} (received_at, payload, ident) FROM STDIN"
_COPY_POSTGRES_NO_IDENT = f"COPY {messages.name} (received_at, payload) FROM STDIN"
# The careful path: COPY into a per-connection temporary table, then one INSERT that skips
# identities already stored and returns the ones it stored.
_INCOMING = "ingest_incoming"
_CREATE_INCOMING = (
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {_INCOMING} "
    "(received_at timestamptz, payload text, ident text) ON COMMIT DELETE ROWS"
)
_COPY_INCOMING = f"COPY {_INCOMING} (received_at, payload, ident) FROM STDIN"
_INSERT_FROM_INCOMING = (
    f"INSERT INTO {messages.name} (received_at, payload, ident) "
    f"SELECT received_at, payload::jsonb, ident FROM {_INCOMING} {_ON_CONFLICT}"
)
# COPY's text format gives backslash, tab, newline and CR a meaning; JSON text may hold them
# (a raw tab or CR only as whitespace between tokens), so escape them.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_escape(text: str) -> str:
    # Most messages need no escaping; four substring scans are much cheaper than translate().
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        return text.translate(_COPY_ESCAPES)
    return text


def _sqlite_rows(batch: list[Message]) -> list[tuple[str, str, str | None]]:
    received = stamps([m.received_at for m in batch], sqlite=True)
    return [(stamp, m.text, m.ident) for stamp, m in zip(received, batch, strict=True)]


def insert_messages(conn: Connection, batch: list[Message]) -> None:
    """SQLite: one executemany of the JSON text as received (the payload column is text)."""
    conn.exec_driver_sql(_INSERT_SQLITE, _sqlite_rows(batch))


def insert_unless_stored(conn: Connection, batch: list[Message]) -> set[str | None]:
    """The one "insert unless the identity is stored", in the caller's transaction (the store's
    careful path, a dead letter's replay); returns the identities it stored (None for a message
    without one, which is always stored)."""
    if conn.dialect.name == "postgresql":
        return _copy_skipping_known(conn, batch)
    return _insert_skipping_known(conn, batch)


def _insert_skipping_known(conn: Connection, batch: list[Message]) -> set[str | None]:
    """SQLite: a row at a time, because RETURNING does not work with executemany."""
    inserted: set[str | None] = set()
    for row in _sqlite_rows(batch):
        inserted.update(r[0] for r in conn.exec_driver_sql(_INSERT_SQLITE_SKIPPING, row))
    return inserted


def _copy_ident(ident: str | None) -> str:
    # An identity is printable ASCII, where only a key's backslash means something to COPY.
    return "\\N" if ident is None else _copy_escape(ident)


def _copy_data(batch: list[Message], *, idents: bool = True) -> str:
    received = stamps([m.received_at for m in batch], sqlite=False)
    if not idents:
        return "".join(f"{stamp}\t{_copy_escape(m.text)}\n" for stamp, m in zip(received, batch, strict=True))
    marks = [m.ident for m in batch]
    if None in marks or "\\" in "".join(cast(list[str], marks)):
        marks = [_copy_ident(ident) for ident in marks]
    # Else (generated identities, most keys: one look at them all) nothing to escape, and no
    # call a message for it: 20-30 % of a consumer's Python time in _copy_data with a spool.
    return "".join(
        f"{stamp}\t{_copy_escape(m.text)}\t{mark}\n" for stamp, m, mark in zip(received, batch, marks, strict=True)
    )


def copy_messages(conn: Connection, batch: list[Message]) -> None:
    """Postgres: COPY in text format, the fastest bulk path measured (see bench/). Messages
    without identities leave the column out, as before identities existed."""
    raw: Any = conn.connection.driver_connection
    idents = any(m.ident is not None for m in batch)
    with raw.cursor() as cursor, cursor.copy(_COPY_POSTGRES if idents else _COPY_POSTGRES_NO_IDENT) as copy:
        copy.write(_copy_data(batch, idents=idents))


def _copy_skipping_known(conn: Connection, batch: list[Message]) -> set[str | None]:
    """Postgres: COPY into the temporary table, then INSERT ... ON CONFLICT DO NOTHING."""
    raw: Any = conn.connection.driver_connection
    with raw.cursor() as cursor:
        cursor.execute(_CREATE_INCOMING)
        with cursor.copy(_COPY_INCOMING) as copy:
            copy.write(_copy_data(batch))
        cursor.execute(_INSERT_FROM_INCOMING)
        return {row[0] for row in cursor.fetchall()}

