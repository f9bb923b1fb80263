"""Database connections, at most `size` at a time, behind a BoundedSemaphore, each use bounded.

SQLAlchemy's pool (pool_size=size, max_overflow=0) would also cap connections, but it hides the
wait. The semaphore makes the cap a visible part of the pipeline: consumers beyond the pool size
block on `acquire()`, and `waiting` / `in_use` (kept under a Lock) become metrics.

A database that hangs instead of failing (a paused server, a network that drops packets) must
not hold a thread forever. Three bounds, from the cheapest to the last resort:
- Postgres connections carry TCP keepalives and `tcp_user_timeout`, so the kernel itself gives up
  on a peer that stopped acknowledging;
- a server-side `statement_timeout` ends a statement the server is stuck in (a lock wait);
- `cut_overdue()`, run by the main loop, shuts down the socket of a connection held longer than
  the statement timeout plus a grace: the one bound that holds when nothing answers at all. The
  thread blocked in it gets a connection error, a transient error to the store: retried on a
  fresh connection.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import create_engine, event, make_url, text
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

CUT_GRACE_S = 1.0  # past the statement timeout, the server's own cancel gets this long to arrive
# The kernel's bounds on a peer that went silent: probe an idle connection after 10 s, every 5 s,
# give up after 3 unanswered probes; give up on data unacknowledged for 30 s.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
              "tcp_user_timeout": 30_000}


@dataclass
class _Held:
    """A driver connection checked out now, and when its use is overdue."""

    driver: Any
    overdue_at: float
    cut: bool = False


class ConnectionPool:
    def __init__(
        self,
        url: str,
        size: int,
        *,
        statement_timeout_s: float = 60.0,
        sqlite_busy_timeout_s: float = 1.0,
        connect_timeout_s: int = 10,
    ) -> None:
        self.size = size
        self.dialect = make_url(url).get_backend_name()
        self.statement_timeout_s = statement_timeout_s
        self._semaphore = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._in_use = 0
        self._waiting = 0
        self._held: dict[int, _Held] = {}  # by id(driver): connections checked out now
        self.engine: Engine = create_engine(
            # No pre-ping: a round trip per batch costs more than it saves. A connection that
            # fails is invalidated by the store and the batch retried on a fresh one.
            url,
            pool_size=size,
            max_overflow=0,
            pool_timeout=30,
            connect_args={} if self.dialect == "sqlite" else _postgres_args(connect_timeout_s, statement_timeout_s),
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
                overdue_at = time.monotonic() + self.statement_timeout_s + CUT_GRACE_S
                with self._lock:
                    self._held[id(driver)] = _Held(driver, overdue_at)
                try:
                    yield conn
                finally:
                    # Under the lock: a cut never reaches a connection back in the pool, whose
                    # socket number may already belong to something else.
                    with self._lock:
                        cut = self._held.pop(id(driver)).cut
                    if cut and not conn.invalidated:
                        conn.invalidate()  # its socket is shut: never hand it out (or roll it back) again
        finally:
            with self._lock:
                self._in_use -= 1
            self._semaphore.release()

    def interrupt(self) -> int:
        """Cut every held connection now; callable from any thread, and it never waits.

        For shutdown past the drain deadline: a write blocked in the database (a lock, a hung
        server) would otherwise keep its non-daemon consumer, and so the process, alive. A
        cancel request would need the server to answer; a socket shut down needs nothing.
        """
        with self._lock:
            return sum(self._cut(held) for held in self._held.values() if not held.cut)

    def cut_overdue(self) -> int:
        """Cut the connections held past the statement timeout (plus a grace); how many were cut."""
        now = time.monotonic()
        with self._lock:
            overdue = [held for held in self._held.values() if now >= held.overdue_at and not held.cut]
            cut = sum(self._cut(held) for held in overdue)
        if cut:
            log.warning("%d database call(s) ran past the %.0fs statement timeout with no answer: "
                        "cut their connection(s); the work is retried on a fresh one", cut, self.statement_timeout_s)
        return cut

    def _cut(self, held: _Held) -> int:
        """Make the thread blocked on `held` fail at once. The caller holds the lock."""
        try:
            if isinstance(held.driver, sqlite3.Connection):
                held.driver.interrupt()
            else:
                _shutdown_socket(held.driver.pgconn.socket)
        except Exception as exc:  # noqa: BLE001 - best effort; the holder's own error path reports
            log.warning("could not cut a database connection: %s", exc)
            return 0
        held.cut = True
        return 1

    def ping(self) -> None:
        """Raise if the database cannot be reached now."""
        with self.connection() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def _postgres_args(connect_timeout_s: int, statement_timeout_s: float) -> dict[str, Any]:
    # connect_timeout: a host that drops packets would otherwise hold a consumer in connect() for
    # minutes; the timeout turns it into a transient error, retried with backoff like any other.
    return {"connect_timeout": connect_timeout_s, **KEEPALIVES,
            "options": f"-c statement_timeout={int(statement_timeout_s * 1000)}"}


def _shutdown_socket(fileno: int) -> None:
    """Shut a connection's socket down both ways, through a duplicate so the driver keeps its own."""
    with socket.socket(fileno=os.dup(fileno)) as duplicate:
        duplicate.shutdown(socket.SHUT_RDWR)


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
