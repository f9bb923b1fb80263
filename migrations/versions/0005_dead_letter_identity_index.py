"""an index on dead_letters.ident: a request written again is not dead-lettered again

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

A request can be written twice: a stream's request delivered again after its writer died
between the commit and the ack, a spool's row fed again after a crash lost its deletion. Its
messages are stored once (the unique index on messages.ident); a message the database refused
was dead-lettered a second time. The store now looks for a letter of the same message and
request before writing one, by this index. Not unique: letters written before this revision may
hold such pairs twice, and another request (a client's retry under a new request id) gets a
letter of its own, so that replaying it moves that request's receipt.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_dead_letters_ident", "dead_letters", ["ident"],
        postgresql_where=sa.text("ident IS NOT NULL"), sqlite_where=sa.text("ident IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_dead_letters_ident", table_name="dead_letters")
