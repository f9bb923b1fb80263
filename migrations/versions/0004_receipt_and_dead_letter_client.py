"""requests.client, dead_letters.client: the client (its token's name) that sent the request

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28

With --auth-tokens a receipt belongs to the client that sent its request: another client's
GET /requests/{id} is 404. A dead letter names its client too, for `ingest dead-letters list`.
Nullable, without a default: rows older than this revision, and every row written without
tokens, have no client (anyone may read those receipts, as before); existing rows are not
rewritten.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("requests", sa.Column("client", sa.Text(), nullable=True))
    op.add_column("dead_letters", sa.Column("client", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dead_letters") as batch:
        batch.drop_column("client")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("client")
