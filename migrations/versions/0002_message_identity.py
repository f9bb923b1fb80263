"""messages.ident: each message's identity, unique, so a retried write stores nothing twice

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

Nullable: rows written before this revision have no identity, nor do messages whose identity
can never be seen twice (generated, without a spool): the partial index leaves NULLs out, so
those rows cost no index entry and the fast COPY path stays as fast as before. Adding a nullable
column without a default is a catalog change on both databases: existing rows are not rewritten.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("ident", sa.Text(), nullable=True))
    op.create_index(
        "uq_messages_ident", "messages", ["ident"], unique=True,
        postgresql_where=sa.text("ident IS NOT NULL"), sqlite_where=sa.text("ident IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("uq_messages_ident", table_name="messages")
    op.drop_column("messages", "ident")
