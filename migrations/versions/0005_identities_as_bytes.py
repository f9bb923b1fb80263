"""identities and request ids compare as bytes; an index on dead_letters.ident

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

Postgres: `messages.ident`, `dead_letters.ident` and `requests.id` take COLLATE "C". They are
opaque keys, compared for equality in unique indexes that every stored message and every
receipt goes through; under the database's linguistic collation each comparison was a strcoll.
Measured here (COPY of 400,000 rows with a generated identity into a unique index, batches of
1,000): C 250,000-260,000 rows/s, C.UTF-8 244,000-247,000, ICU en-US 194,000-209,000. Changing
the collation rebuilds the indexes on these columns (the tables are not rewritten): on a large
database, run `ingest db upgrade` when a lock on them for that long is acceptable. SQLite
compares text as bytes already.

Both databases: an index on `dead_letters.ident` (where not NULL). A request can be written
twice: a stream's request delivered again after its writer died between the commit and the ack,
a spool's row fed again after a crash lost its deletion. Its messages are stored once (the
unique index on messages.ident), but a message the database refused was dead-lettered a second
time. The store now looks for a letter of the same message and request before writing one, by
this index. Not unique: letters written before this revision may hold such pairs twice, and
another request (a client's retry under a new request id) gets a letter of its own, so that
replaying it moves that request's receipt.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_KEYS = (("messages", "ident", True), ("dead_letters", "ident", True), ("requests", "id", False))


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, column, nullable in _KEYS:
            op.alter_column(table, column, type_=sa.Text(collation="C"), existing_nullable=nullable)
    op.create_index(
        "ix_dead_letters_ident", "dead_letters", ["ident"],
        postgresql_where=sa.text("ident IS NOT NULL"), sqlite_where=sa.text("ident IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_dead_letters_ident", table_name="dead_letters")
    if op.get_bind().dialect.name == "postgresql":
        for table, column, nullable in _KEYS:
            op.alter_column(table, column, type_=sa.Text(), existing_nullable=nullable)
