"""requests: a receipt per accepted request; dead_letters keep identity and request

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

`requests` is written in the same transaction as the messages it counts, so any replica on the
database can answer `GET /requests/{id}` with one primary-key lookup. A dead letter keeps its
message's identity (so a replay stores it at most once) and its request (so the receipt moves from
dead-lettered to stored when a replay stores it). All new columns are nullable: existing rows are
not rewritten.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("accepted", sa.Integer(), nullable=False),
        sa.Column("stored", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("dead_lettered", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_requests"),
    )
    op.add_column("dead_letters", sa.Column("ident", sa.Text(), nullable=True))
    op.add_column("dead_letters", sa.Column("request", sa.Text(), nullable=True))
    op.create_index("ix_dead_letters_failed_at", "dead_letters", ["failed_at"])


def downgrade() -> None:
    op.drop_index("ix_dead_letters_failed_at", table_name="dead_letters")
    with op.batch_alter_table("dead_letters") as batch:
        batch.drop_column("request")
        batch.drop_column("ident")
    op.drop_table("requests")
