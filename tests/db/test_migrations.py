"""Alembic creates the schema on both databases, upgrades are idempotent, and there is no drift."""

import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from ingest.db import migrate
from ingest.db.tables import metadata


def test_upgrade_creates_tables_without_drift(empty_db_url, make_engine) -> None:
    engine = make_engine(empty_db_url)
    assert migrate.current(engine) is None
    migrate.upgrade(engine)
    migrate.upgrade(engine)  # a second run is a no-op
    assert migrate.current(engine) == migrate.head() == "0005"
    assert {"messages", "dead_letters", "alembic_version"} <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert diff == []


def test_ingest_db_upgrade_command_from_any_directory(postgres_url, tmp_path) -> None:
    """The installed package finds its migrations; the working directory does not matter."""
    command = [sys.executable, "-m", "ingest", "db", "upgrade", "--db", postgres_url]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(": empty -> 0005")
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert again.stdout.strip().endswith(": 0005 -> 0005")


def test_serve_without_migrations_on_empty_database_says_what_to_do(empty_sqlite_url) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ingest", "serve", "--port", "0", "--no-migrate", "--db", empty_sqlite_url],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "ingest: error: database schema is at revision none, this ingest needs 0005 "
        "(missing messages, dead_letters, requests): run `ingest db upgrade` or start without --no-migrate"
    )


def test_serve_without_migrations_on_a_migrated_database_starts(empty_sqlite_url, make_service) -> None:
    assert subprocess.run([sys.executable, "-m", "ingest", "db", "upgrade", "--db", empty_sqlite_url]).returncode == 0
    service = make_service(db_url=empty_sqlite_url, migrate=False)
    assert service.health.ready()


def test_each_test_gets_its_own_copy_of_a_database_at_head(sqlite_url, sqlite_template, make_engine) -> None:
    """sqlite_url is a copy of the session's template: at head, and what a test writes stays in its copy."""
    engine = make_engine(sqlite_url)
    assert migrate.current(engine) == migrate.head()
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO messages (received_at, payload) VALUES (CURRENT_TIMESTAMP, '{}')")
    template = make_engine(f"sqlite:///{sqlite_template}")
    with template.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM messages").scalar_one() == 0


def test_upgrading_from_0003_keeps_receipts_and_letters_without_a_client(empty_db_url, make_engine) -> None:
    engine = make_engine(empty_db_url)
    migrate.upgrade(engine, "0003")
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO requests (id, accepted, stored, dead_lettered, received_at) "
            "VALUES ('old-1', 3, 2, 1, CURRENT_TIMESTAMP)"
        ))
        conn.execute(text(
            "INSERT INTO dead_letters (received_at, payload, error, request) "
            "VALUES (CURRENT_TIMESTAMP, '{', 'refused', 'old-1')"
        ))
    migrate.upgrade(engine)
    assert migrate.current(engine) == "0005"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id, accepted, stored, dead_lettered, client FROM requests")).all() == [
            ("old-1", 3, 2, 1, None)
        ]
        assert conn.execute(text("SELECT request, client FROM dead_letters")).all() == [("old-1", None)]


def test_identities_and_request_ids_compare_as_bytes_on_postgres(postgres_head_url, make_engine) -> None:
    """0005: opaque keys in unique indexes, not strcoll under the database's collation."""
    engine = make_engine(postgres_head_url)
    with engine.connect() as conn:
        found = set(conn.execute(text(
            "SELECT table_name, column_name, collation_name FROM information_schema.columns "
            "WHERE (table_name, column_name) IN (('messages', 'ident'), ('dead_letters', 'ident'), ('requests', 'id'))"
        )).tuples())
        indexes = {row.indexname for row in conn.execute(text("SELECT indexname FROM pg_indexes"))}
    assert found == {("messages", "ident", "C"), ("dead_letters", "ident", "C"), ("requests", "id", "C")}
    assert "ix_dead_letters_ident" in indexes

