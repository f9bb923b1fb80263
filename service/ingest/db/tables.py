"""The schema as SQLAlchemy Core tables: what migrations create and what the store writes.

Imports nothing from ingest, so Alembic's env.py can load it alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# How SQLAlchemy's DateTime stores a moment on SQLite (text, naive UTC); raw writes use the same.
SQLITE_STAMP = "%Y-%m-%d %H:%M:%S.%f"


def stamps(moments: Iterable[float], *, sqlite: bool) -> list[str]:
    """Epoch seconds as the text a raw write sends: SQLITE_STAMP, or ISO 8601 in UTC (Postgres).

    Rendered from a prefix made once a second: datetime's own rendering cost a 1-message
    request's row about 1 µs of a consumer's time (profiled), where each has its own moment.
    The microseconds round half to even, as datetime.fromtimestamp rounds them.
    """
    sep, zone = (" ", "") if sqlite else ("T", "+00:00")
    heads: dict[int, str] = {}
    out: list[str] = []
    last, rendered = None, ""
    for moment in moments:
        if moment != last:  # a request's messages share one moment, and lie side by side
            whole = math.floor(moment)
            micros = round((moment - whole) * 1_000_000)
            if micros == 1_000_000:
                whole, micros = whole + 1, 0
            head = heads.get(whole)
            if head is None:
                head = heads[whole] = datetime.fromtimestamp(whole, UTC).strftime(f"%Y-%m-%d{sep}%H:%M:%S")
            last, rendered = moment, f"{head}.{micros:06d}{zone}"
        out.append(rendered)
    return out


# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
_ID = BigInteger().with_variant(Integer(), "sqlite")
# Identities and request ids are opaque keys: on Postgres they compare as bytes (COLLATE "C",
# 0005), not by the database's linguistic collation. SQLite compares text as bytes already.
_KEY = Text().with_variant(Text(collation="C"), "postgresql")

messages = Table(
    "messages",
    metadata,
    Column("id", _ID, Identity(), primary_key=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("stored_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("payload", JSON().with_variant(JSONB(), "postgresql"), nullable=False),
    # The message's identity (identity.py): writes skip one already stored, so a retried request
    # or a re-sent batch is stored once. NULL where no second copy can come (a generated identity
    # without a spool) and in rows older than 0002; the partial index leaves those out.
    Column("ident", _KEY, nullable=True),
    Index(
        "uq_messages_ident", "ident", unique=True,
        postgresql_where=text("ident IS NOT NULL"), sqlite_where=text("ident IS NOT NULL"),
    ),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", _ID, Identity(), primary_key=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("failed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Text, not JSON: the database refused this payload as JSON, so keep it as received.
    Column("payload", Text(), nullable=False),
    Column("error", Text(), nullable=False),
    # Kept so a replay stores the message at most once, and moves its receipt (both NULL in
    # letters older than 0003).
    Column("ident", _KEY, nullable=True),
    Column("request", Text(), nullable=True),
    # The client (its token's name) that sent it: NULL without --auth-tokens and before 0004.
    Column("client", Text(), nullable=True),
    Index("ix_dead_letters_failed_at", "failed_at"),
    # The store's look for a letter of the same message and request (0005).
    Index(
        "ix_dead_letters_ident", "ident",
        postgresql_where=text("ident IS NOT NULL"), sqlite_where=text("ident IS NOT NULL"),
    ),
)

# A receipt per accepted request, written in the transaction that stores (or dead-letters) its
# messages: `stored` counts messages of the request now in the database, written by it or (a
# retry's duplicates) by an earlier request. `client`: with --auth-tokens, the name of the client
# that sent it, the only one that may read it; NULL without tokens and before 0004 (anyone may).
requests = Table(
    "requests",
    metadata,
    Column("id", _KEY, primary_key=True),
    Column("accepted", Integer(), nullable=False),
    Column("stored", Integer(), nullable=False, server_default="0"),
    Column("dead_lettered", Integer(), nullable=False, server_default="0"),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("client", Text(), nullable=True),
)
