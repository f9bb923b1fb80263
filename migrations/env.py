"""Alembic environment: the schema comes from ingest.db.tables, the connection from the caller.

`ingest db upgrade` and `ingest serve` pass their connection in `config.attributes`; the plain
`alembic` command line builds one from `sqlalchemy.url` instead.
"""

from alembic import context
from sqlalchemy import create_engine

from ingest.db.tables import metadata

config = context.config


def run_migrations(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        transaction_per_migration=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as connection:
        run_migrations(connection)
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("ingest migrations run online only: give a database URL")
main()
