"""messages.ident: each message's identity, unique, so a retried write stores nothing twice

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

Nullable: rows written before this revision have no identity, and a unique index allows any
number of NULLs on both Postgres and SQLite. Adding a nullable column without a default is a
catalog change on both, so upgrading a table that already holds rows does not rewrite them.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("ident", sa.Text(), nullable=True))
    op.create_index("uq_messages_ident", "messages", ["ident"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_messages_ident", table_name="messages")
    op.drop_column("messages", "ident")
