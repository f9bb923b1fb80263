"""Alembic creates the schema on both databases, upgrades are idempotent, and there is no drift."""

import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from ingest import migrate
from ingest.tables import metadata


def test_upgrade_creates_tables_without_drift(db_url, make_engine) -> None:
    engine = make_engine(db_url)
    assert migrate.current(engine) is None
    migrate.upgrade(engine)
    migrate.upgrade(engine)  # a second run is a no-op
    assert migrate.current(engine) == migrate.head() == "0003"
    assert {"messages", "dead_letters", "alembic_version"} <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert diff == []


def test_ingest_db_upgrade_command_from_any_directory(postgres_url, tmp_path) -> None:
    """The installed package finds its migrations; the working directory does not matter."""
    command = [sys.executable, "-m", "ingest", "db", "upgrade", "--db", postgres_url]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(": empty -> 0003")
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert again.stdout.strip().endswith(": 0003 -> 0003")


def test_serve_without_migrations_on_empty_database_says_what_to_do(sqlite_url) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ingest", "serve", "--port", "0", "--no-migrate", "--db", sqlite_url],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "ingest: error: database schema is at revision none, this ingest needs 0003 "
        "(missing messages, dead_letters, requests): run `ingest db upgrade` or start without --no-migrate"
    )


def test_serve_without_migrations_on_a_migrated_database_starts(sqlite_url, make_service) -> None:
    assert subprocess.run([sys.executable, "-m", "ingest", "db", "upgrade", "--db", sqlite_url]).returncode == 0
    service = make_service(migrate=False)
    assert service.health.ready()
