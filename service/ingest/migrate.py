"""Programmatic Alembic: the one path both `ingest db upgrade` and `ingest serve` use."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine


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


def upgrade_url(url: str) -> tuple[str | None, str]:
    """`ingest db upgrade`: migrate the database at `url`; returns (before, after) revisions."""
    engine = create_engine(url)
    try:
        before = current(engine)
        upgrade(engine)
        return before, head()
    finally:
        engine.dispose()
