"""The `requests` table: receipts written inside the store's transactions, read by any replica.

A batch's receipt rows go in the transaction that stores its messages (or dead-letters one), so
the counts can never run ahead of or behind what is committed. One upsert a batch, whatever its
number of requests: Postgres takes the rows as arrays through `unnest`, SQLite an executemany.
Rows are sorted by id, so two consumers updating the same requests lock them in the same order.

On the store's fast path (`fresh`), Postgres gets a COPY instead for each request whose id this
process made and whose messages are all in the batch: no row of it can exist yet, and a COPY row
cost the database 5.2 µs where the upsert's cost 9-10 µs (backend CPU, batches of 500, measured
here). Should one exist after all (a batch written again after an uncertain commit), the COPY
fails on the key, the transaction rolls back, and the store writes the batch the careful way,
whose receipts are upserted.

With --auth-tokens a row names its client (its owner). The first client known for an id keeps
it: another client's request under the same id adds nothing to that row (it would otherwise
change someone else's receipt), and a writer that knows no client (rows a spool kept from before
receipts had owners) adds to any.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ColumnElement

from ingest.db.pool import ConnectionPool
from ingest.db.tables import requests, stamps
from ingest.messages import Message, Receipt
from ingest.receipts import Counts, may_read

_TABLE = requests.name
_UPDATE = (
    "ON CONFLICT (id) DO UPDATE SET "
    f"accepted = {{greatest}}({_TABLE}.accepted, excluded.accepted), "
    # Never past what was accepted and not dead-lettered (nor below 0): a batch written again (a
    # stream's request delivered again after its writer died between the commit and the ack, a
    # spool's re-send) finds its messages stored and would otherwise count them twice, or count as
    # stored a message whose letter came after them (the store does not letter a request's message
    # twice).
    f"stored = {{greatest}}(0, {{least}}({_TABLE}.stored + excluded.stored, "
    f"{{greatest}}({_TABLE}.accepted, excluded.accepted) - {_TABLE}.dead_lettered - excluded.dead_lettered)), "
    f"dead_lettered = {_TABLE}.dead_lettered + excluded.dead_lettered, "
    f"client = coalesce({_TABLE}.client, excluded.client) "
    f"WHERE {_TABLE}.client IS NULL OR excluded.client IS NULL OR {_TABLE}.client = excluded.client"
)
_UPSERT_POSTGRES = (
    f"INSERT INTO {_TABLE} (id, accepted, stored, dead_lettered, received_at, client) "
    "SELECT id, accepted, stored, dead, to_timestamp(received), client FROM unnest("
    "%s::text[], %s::int[], %s::int[], %s::int[], %s::float8[], %s::text[]) "
    "AS r(id, accepted, stored, dead, received, client) "
    + _UPDATE.format(greatest="GREATEST", least="LEAST")
)
_COPY_POSTGRES = f"COPY {_TABLE} (id, accepted, stored, dead_lettered, received_at, client) FROM STDIN"
_UPSERT_SQLITE = (
    f"INSERT INTO {_TABLE} (id, accepted, stored, dead_lettered, received_at, client) VALUES (?, ?, ?, ?, ?, ?) "
    + _UPDATE.format(greatest="max", least="min")
)


def write(conn: Connection, messages: Iterable[Message], *, dead: bool = False, fresh: bool = False) -> None:
    """Add these messages to their requests' rows as stored (or, `dead`, dead-lettered).
    `fresh`: the store's fast path, where whole requests of ids made here may be inserted."""
    counts = Counter(m.receipt for m in messages if m.receipt is not None)
    if not counts:
        return
    receipts: list[tuple[Receipt, int]] = sorted(counts.items(), key=lambda item: item[0].id)
    postgres = conn.dialect.name == "postgresql"
    if postgres and fresh and not dead:
        whole: list[Receipt] = []
        rest: list[tuple[Receipt, int]] = []
        for receipt, n in receipts:
            if receipt.fresh and n == receipt.accepted:
                whole.append(receipt)
            else:
                rest.append((receipt, n))
        if whole:
            _copy_whole(conn, whole)
        if not rest:
            return
        receipts = rest
    stored = [0 if dead else n for _, n in receipts]
    dead_counts = [n if dead else 0 for _, n in receipts]
    if postgres:
        conn.exec_driver_sql(_UPSERT_POSTGRES, (
            _text_array([r.id for r, _ in receipts]), _number_array([r.accepted for r, _ in receipts]),
            _number_array(stored), _number_array(dead_counts), _number_array([r.received_at for r, _ in receipts]),
            _names_array([r.client for r, _ in receipts]),
        ))
        return
    received = stamps([r.received_at for r, _ in receipts], sqlite=True)
    conn.exec_driver_sql(_UPSERT_SQLITE, [
        (r.id, r.accepted, s, d, stamp, r.client)
        for (r, _), s, d, stamp in zip(receipts, stored, dead_counts, received, strict=True)
    ])


def _copy_whole(conn: Connection, receipts: list[Receipt]) -> None:
    """Postgres: rows of whole, fresh requests (all stored), by COPY. Ids made here and client
    names (auth.py) need no escaping in COPY's text format; \\N is its NULL."""
    received = stamps([r.received_at for r in receipts], sqlite=False)
    data = "".join(
        f"{r.id}\t{r.accepted}\t{r.accepted}\t0\t{stamp}\t{r.client or chr(92) + 'N'}\n"
        for r, stamp in zip(receipts, received, strict=True)
    )
    raw: Any = conn.connection.driver_connection
    with raw.cursor() as cursor, cursor.copy(_COPY_POSTGRES) as copy:
        copy.write(data)


# Array literals written here, not by psycopg's list dumper: it checks every element with a
# regular expression, which cost a 1-message request's row 3 µs of the consumer's time
# (profiled), more than the rest of its receipt.


def _number_array(values: list[int] | list[float]) -> str:
    return "{" + ",".join(map(repr, values)) + "}"  # a float's repr reads back exactly


def _text_array(values: list[str]) -> str:
    # Request ids are of sane form (receipts.py), so quoting each is enough; escape otherwise.
    joined = '","'.join(values)
    if "\\" in joined or joined.count('"') != 2 * (len(values) - 1):
        joined = '","'.join(v.replace("\\", "\\\\").replace('"', '\\"') for v in values)
    return '{"' + joined + '"}'


def _names_array(values: list[str | None]) -> str:
    # Client names are letters, digits, _ . - (auth.py): quoting is enough.
    return "{" + ",".join("NULL" if v is None else f'"{v}"' for v in values) + "}"


def move_to_stored(conn: Connection, request_id: str) -> None:
    """One message of the request moves from dead-lettered to stored (a replayed dead letter),
    neither count past its bounds."""
    conn.execute(
        update(requests)
        .where(requests.c.id == request_id)
        .values(
            dead_lettered=case((requests.c.dead_lettered > 0, requests.c.dead_lettered - 1), else_=0),
            stored=case((requests.c.stored < requests.c.accepted, requests.c.stored + 1), else_=requests.c.stored),
        )
    )


def lookup(pool: ConnectionPool, request_id: str, client: str | None = None) -> Counts | None:
    """One primary-key lookup; None for an id the database has no row for, or one `client` may
    not read (receipts.may_read; None: without tokens, anyone may)."""
    query = select(
        requests.c.accepted, requests.c.stored, requests.c.dead_lettered, requests.c.client
    ).where(requests.c.id == request_id)
    with pool.connection() as conn:
        row = conn.execute(query).first()
    if row is None or not may_read(row.client, client):
        return None
    return Counts.of(row.accepted, row.stored, row.dead_lettered)


def count_before(engine: Engine, before: datetime) -> int:
    """Receipts of requests received before `before` (an aware datetime)."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(requests).where(_before(before))).scalar_one())


def purge(engine: Engine, before: datetime) -> int:
    """Delete the receipts of requests received before `before`; their ids then answer 404.

    Nothing else deletes them: one row a request, they grow like `messages` until purged."""
    with engine.begin() as conn:
        return conn.execute(delete(requests).where(_before(before))).rowcount


def _before(before: datetime) -> ColumnElement[bool]:
    # Bound as UTC: SQLite keeps naive UTC text and compares text, ignoring any offset.
    return requests.c.received_at < before.astimezone(UTC)
