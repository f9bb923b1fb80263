"""Fixtures that own their cleanup: databases (SQLite files, real Postgres), running services."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from ingest.config import Settings
from ingest.service import Service

POSTGRES_ADMIN = os.environ.get("INGEST_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
DATA_THREADS = ("listener", "consumer-")


def _admin_connection() -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        # Fail, never skip: a green run without Postgres would mean nothing was tested.
        pytest.fail(f"Postgres tests need {POSTGRES_ADMIN} (set INGEST_TEST_POSTGRES): {exc}")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty Postgres database for one test, dropped afterwards."""
    name = f"ingest_test_{uuid.uuid4().hex[:12]}"
    with _admin_connection() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with _admin_connection() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Any) -> str:
    return f"sqlite:///{tmp_path / 'ingest.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
def make_engine() -> Iterator[Callable[[str], Engine]]:
    engines: list[Engine] = []

    def make(url: str) -> Engine:
        engine = create_engine(url)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def make_service(sqlite_url: str) -> Iterator[Callable[..., Service]]:
    """Start services on port 0 (SQLite unless db_url is given); stop them and check no data
    thread survives."""
    running: list[tuple[Service, threading.Thread]] = []

    def make(**overrides: Any) -> Service:
        values: dict[str, Any] = {"port": 0, "db_url": sqlite_url, "consumers": 2, "drain_timeout_s": 20.0}
        values.update(overrides)
        service = Service(Settings.from_mapping(values))
        service.start()
        # What the main thread does in `ingest serve`: supervise until stopping, then stop.
        supervisor = threading.Thread(target=service.run, name="test-main-loop")
        supervisor.start()
        running.append((service, supervisor))
        return service

    yield make
    # Last started, first stopped: each service's excepthook then unwinds to the one before it.
    for service, supervisor in reversed(running):
        service.shutdown.stopping.set()
        supervisor.join(60)
        service.stop()
    survivors = [t.name for t in threading.enumerate() if t.name.startswith(DATA_THREADS) and t.is_alive()]
    assert not survivors, f"threads outlived their service: {survivors}"

