"""Database connections, at most `size` at a time, behind a BoundedSemaphore.

SQLAlchemy's pool (pool_size=size, max_overflow=0) would also cap connections, but it hides the
wait. The semaphore makes the cap a visible part of the pipeline: consumers beyond the pool size
block on `acquire()`, and `waiting` / `in_use` (kept under a Lock) become metrics.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event, make_url, text
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)


class ConnectionPool:
    def __init__(
        self, url: str, size: int, *, sqlite_busy_timeout_s: float = 1.0, connect_timeout_s: int = 10
    ) -> None:
        self.size = size
        self.dialect = make_url(url).get_backend_name()
        self._semaphore = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._in_use = 0
        self._waiting = 0
        self._drivers: set[Any] = set()  # driver connections held now, for interrupt()
        self.engine: Engine = create_engine(
            # No pre-ping: a round trip per batch costs more than it saves. A connection that
            # fails is invalidated by the store and the batch retried on a fresh one.
            url,
            pool_size=size,
            max_overflow=0,
            pool_timeout=30,
            # A host that drops packets would otherwise hold a consumer in connect() for minutes;
            # a timeout turns it into a transient error, retried with backoff like any other.
            connect_args={} if self.dialect == "sqlite" else {"connect_timeout": connect_timeout_s},
        )
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine, sqlite_busy_timeout_s)

    def __repr__(self) -> str:
        return f"ConnectionPool({self.dialect}, size={self.size}, in_use={self._in_use}, waiting={self._waiting})"

    @property
    def in_use(self) -> int:
        with self._lock:
            return self._in_use

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._waiting

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """A connection for the duration of the block; blocks while `size` are in use."""
        with self._lock:
            self._waiting += 1
        try:
            self._semaphore.acquire()
        finally:
            with self._lock:
                self._waiting -= 1
        try:
            with self._lock:
                self._in_use += 1
            with self.engine.connect() as conn:
                driver = conn.connection.driver_connection
                with self._lock:
                    self._drivers.add(driver)
                try:
                    yield conn
                finally:
                    with self._lock:
                        self._drivers.discard(driver)
        finally:
            with self._lock:
                self._in_use -= 1
            self._semaphore.release()

    def interrupt(self) -> int:
        """Cancel what every held connection is running; callable from any thread.

        For shutdown past the drain deadline: a write blocked in the database (a lock, a hung
        server) would otherwise keep its non-daemon consumer, and so the process, alive.
        libpq's cancel request and sqlite3's interrupt() are both made for another thread.
        """
        with self._lock:
            drivers = list(self._drivers)
        for driver in drivers:
            try:
                if isinstance(driver, sqlite3.Connection):
                    driver.interrupt()
                else:
                    driver.cancel_safe(timeout=5.0)
            except Exception as exc:  # noqa: BLE001 - best effort; the writer's own error path reports
                log.warning("could not interrupt a database connection: %s", exc)
        return len(drivers)

    def ping(self) -> None:
        """Raise if the database cannot be reached now."""
        with self.connection() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def _configure_sqlite(engine: Engine, busy_timeout_s: float) -> None:
    """WAL lets readers run beside the writer; busy_timeout turns lock contention into a wait."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        assert isinstance(dbapi_connection, sqlite3.Connection)
        cursor = dbapi_connection.cursor()
        # The timeout first: switching to WAL takes a lock another process (a second worker, a
        # dead-letters command) may hold for a moment, and without it that is "database is locked".
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()
