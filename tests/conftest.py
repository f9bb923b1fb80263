"""Fixtures that own their cleanup: databases (SQLite files, real Postgres), running services."""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from ingest.config import Settings
from ingest.db import migrate
from ingest.service import Service
from support.stages import Stages, build_stages

POSTGRES_ADMIN = os.environ.get("INGEST_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
DATA_THREADS = ("listener", "consumer-")


DOCKER_TESTS = "tests/stack/test_docker_"  # the modules marked `docker`, and only they


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """What the scheduler below relies on. The Docker tests are the `docker` marker's (-m) and
    its own, by module name: both must agree. And no two tests share a node id: it keys tests by
    id, and would run one of them for all."""
    strays = [item.nodeid for item in items
              if (item.get_closest_marker("docker") is not None) != item.nodeid.startswith(DOCKER_TESTS)]
    if strays:
        raise pytest.UsageError(f"Docker tests live in {DOCKER_TESTS}*.py, marked docker, and only they: {strays}")
    shared = sorted(nodeid for nodeid, n in Counter(item.nodeid for item in items).items() if n > 1)
    if shared:
        raise pytest.UsageError(f"tests sharing a node id (give each an id of its own): {shared}")


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With pytest-xdist (`-n 2`, tests/run), the Docker tests all go to one process, in file
    order: each module starts the engine if none answers and stops what it started, so two
    processes would stop it under each other. The rest go test by test to whichever is free.
    (`--dist loadgroup` would say this with marks, but pytest 9.2 ignores the node ids that
    xdist 3.8 rewrites for it: the groups were split.) Other --dist modes are left as asked."""
    if config.getoption("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class DockerTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "docker" if nodeid.startswith(DOCKER_TESTS) else nodeid

    return DockerTogether(config, log)


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


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database migrated to head once a session, by the path `ingest serve` takes."""
    path = tmp_path_factory.mktemp("template") / "ingest.db"
    engine = create_engine(f"sqlite:///{path}")
    try:
        migrate.upgrade(engine)
        with engine.connect() as conn:
            # Whatever the journal mode, every committed page must be in the main file, the one
            # file copied (a no-op unless the template is in WAL mode).
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        engine.dispose()  # closes every connection: no -wal, -shm or -journal left beside it
    siblings = sorted(p.name for p in path.parent.iterdir() if p != path)
    assert not siblings, f"the template would be copied without {siblings}"
    return path


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    """A SQLite database already at head: a copy of the session's template."""
    path = tmp_path / "ingest.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def empty_sqlite_url(tmp_path: Path) -> str:
    """A SQLite database never migrated (its file does not exist yet): for migrations, --no-migrate
    and missing-schema tests."""
    return f"sqlite:///{tmp_path / 'empty.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """SQLite at head, or an empty Postgres database: migrate it if the test needs the schema
    (a no-op on the SQLite copy)."""
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db_url(request: pytest.FixtureRequest) -> str:
    """A database of either kind that was never migrated."""
    return str(request.getfixturevalue("empty_sqlite_url" if request.param == "sqlite" else "postgres_url"))


@pytest.fixture
def postgres_head_url(postgres_url: str) -> str:
    """A fresh Postgres database migrated to head."""
    engine = create_engine(postgres_url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    return postgres_url


@pytest.fixture(params=["sqlite", "postgres"])
def head_db_url(request: pytest.FixtureRequest) -> str:
    """A database of either kind at head: the SQLite copy, or a fresh Postgres database migrated."""
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_head_url"))


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
def make_stages() -> Iterator[Callable[..., Stages]]:
    """Pool, store and buffer built by hand on a database at head (stages.py); pools disposed after."""
    made: list[Stages] = []

    def make(url: str, **kwargs: Any) -> Stages:
        stages = build_stages(url, **kwargs)
        made.append(stages)
        return stages

    yield make
    for stages in made:
        stages.hard_stop.set()  # ends any retry a failed test left behind
        stages.pool.dispose()


@pytest.fixture
def make_service(sqlite_url: str) -> Iterator[Callable[..., Service]]:
    """Start services on port 0 (SQLite unless db_url is given); stop them and check no data
    thread survives."""
    running: list[tuple[Service, threading.Thread]] = []

    def make(**overrides: Any) -> Service:
        values: dict[str, Any] = {"port": 0, "db_url": sqlite_url, "consumers": 2, "drain_timeout_s": 20.0}
        listens = overrides.pop("_listens", True)  # False: a stream buffer's writer (`ingest write`)
        values.update(overrides)
        service = Service(Settings.from_mapping(values), listens=listens)
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

