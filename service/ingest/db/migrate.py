"""Programmatic Alembic: the one path both `ingest db upgrade` and `ingest serve` use, and the one
answer to "is the schema ready?" (`check_at_head`), asked by start, `--workers` and the admin
commands alike."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import Engine

from ingest.db.tables import metadata
from ingest.errors import SchemaNotReady


def _config() -> Config:
    # migrations/ at the top of the repository ships as the package ingest.migrations.
    spec = importlib.util.find_spec("ingest.migrations")
    assert spec is not None and spec.submodule_search_locations is not None
    config = Config()
    config.set_main_option("script_location", str(Path(spec.submodule_search_locations[0])))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` in the engine's database, one transaction a migration."""
    config = _config()
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            # A migration may rewrite a big table: the service's statement timeout is for writes.
            connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def head() -> str:
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None
    return revision


def current(engine: Engine) -> str | None:
    """The revision the database is at, or None for a database never migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def check_at_head(engine: Engine) -> None:
    """Raise SchemaNotReady unless the database is at the revision this code writes; the message
    names the revisions and what is missing, and the caller adds what to do about it."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        # Connecting would create an empty file: say there is no database instead.
        raise SchemaNotReady("no such database file")
    revision = current(engine)
    needed = head()
    if revision == needed:
        return
    missing = _missing(engine)
    raise SchemaNotReady(
        f"schema is at revision {revision or 'none'}, this ingest needs {needed}"
        + (f" (missing {', '.join(missing)})" if missing else "")
    )


def _missing(engine: Engine) -> list[str]:
    """Tables and columns of this code's schema that the database does not have."""
    inspector = inspect(engine)
    present = set(inspector.get_table_names())
    missing: list[str] = []
    for table in metadata.tables.values():
        if table.name not in present:
            missing.append(table.name)
            continue
        columns = {c["name"] for c in inspector.get_columns(table.name)}
        missing.extend(f"{table.name}.{c.name}" for c in table.columns if c.name not in columns)
    return missing


def upgrade_url(url: str) -> tuple[str | None, str]:
    """`ingest db upgrade`: migrate the database at `url`; returns (before, after) revisions."""
    engine = create_engine(url)
    try:
        before = current(engine)
        upgrade(engine)
        return before, head()
    finally:
        engine.dispose()
