"""The consumer side built by hand, as service.py builds it, for tests that drive one stage.

No threads are started and no listener is bound: a test puts messages in the buffer, calls
`ConsumerThread.step()` or `Store.write()` on its own thread, and reads rows and samples.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import event, select
from sqlalchemy.engine import Engine

from ingest.buffer import Buffer
from ingest.consumers import ConsumerThread
from ingest.db.pool import ConnectionPool
from ingest.db.store import Backoff, Store, WriteResult
from ingest.db.tables import dead_letters, messages
from ingest.messages import Message, Receipt
from ingest.metrics import Metrics
from ingest.receipts import Ledger

CONSUMER = "consumer-1"
MOMENT = 1764243000.25  # a fixed received_at: rows compare exactly


@dataclass
class Stages:
    """One pool, store and buffer with their own registry; `statements` holds the SQL sent
    through SQLAlchemy (SQLite's inserts all go that way; Postgres' COPY does not)."""

    pool: ConnectionPool
    store: Store
    buffer: Buffer
    metrics: Metrics
    hard_stop: threading.Event
    ledger: Ledger = field(default_factory=Ledger)
    statements: list[str] = field(default_factory=list)

    @property
    def engine(self) -> Engine:
        return self.pool.engine

    @property
    def dialect(self) -> str:
        return self.pool.dialect

    def consumer(
        self, *, batch_size: int = 100, after_commit: Callable[[list[Message], WriteResult], None] | None = None
    ) -> ConsumerThread:
        """A consumer never started: no linger, no wait for work, so step() returns at once."""
        return ConsumerThread(
            CONSUMER, buffer=self.buffer, store=self.store, metrics=self.metrics, ledger=self.ledger,
            batch_size=batch_size, linger_s=0.0, hard_stop=self.hard_stop, idle_wait_s=0.0, after_commit=after_commit,
        )

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or {})
        assert value is not None, f"no sample {name}{labels or ''}"
        return value

    def rows(self) -> list[tuple[str | None, object]]:
        """(ident, payload) of every stored message, in insertion order; payloads decoded."""
        with self.engine.connect() as conn:
            found = conn.execute(select(messages.c.ident, messages.c.payload).order_by(messages.c.id)).all()
        return [(ident, json.loads(p) if isinstance(p, str) else p) for ident, p in found]

    def letters(self) -> list[tuple[str | None, str, str]]:
        """(ident, payload as received, error) of every dead letter."""
        with self.engine.connect() as conn:
            found = conn.execute(
                select(dead_letters.c.ident, dead_letters.c.payload, dead_letters.c.error).order_by(dead_letters.c.id)
            ).all()
        return [(ident, payload, error) for ident, payload, error in found]


def build_stages(url: str, *, busy_timeout_s: float = 1.0) -> Stages:
    """Build the stages on a database at head; the store has checked its tables, as a consumer
    does before the service opens (which also puts SQLite in WAL mode). The caller disposes the pool."""
    metrics = Metrics([CONSUMER])
    # One connection: the careful path's temporary table (Postgres) stays visible to the test.
    pool = ConnectionPool(url, 1, sqlite_busy_timeout_s=busy_timeout_s)
    hard_stop = threading.Event()
    # Short backoff: a retry test waits for a lock to go, not for the production delays.
    store = Store(pool, metrics, hard_stop, Backoff(base_s=0.005, cap_s=0.02))
    stages = Stages(pool=pool, store=store, buffer=Buffer(1000), metrics=metrics, hard_stop=hard_stop)

    @event.listens_for(pool.engine, "before_cursor_execute")
    def _record(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        stages.statements.append(statement)

    try:
        store.check()
    except BaseException:
        pool.dispose()
        raise
    return stages


def careful_path_taken(stages: Stages) -> bool:
    """Whether a write went the duplicate-skipping way (store.py) rather than the fast path."""
    if stages.dialect == "sqlite":
        return any("ON CONFLICT (ident)" in s and s.startswith(f"INSERT INTO {messages.name}")
                   for s in stages.statements)
    # Postgres: the careful path COPYs into a temporary table of the (only) pooled connection.
    with stages.pool.connection() as conn:
        return conn.exec_driver_sql("SELECT to_regclass('pg_temp.ingest_incoming')").scalar() is not None


def waiting(count: int) -> Receipt:
    """The record of an ack=commit request of `count` messages: its client awaits `.future`."""
    return Receipt(f"req-{count}", count, MOMENT, waited_on=True)


def fresh(texts: list[str], prefix: str = "g:test:", ack: Receipt | None = None) -> list[Message]:
    """Messages with identities no stored row can have (known=False): the store's fast path."""
    return [Message(t, MOMENT, ident=f"{prefix}{n}", known=False, receipt=ack) for n, t in enumerate(texts)]


def known(texts: list[str], prefix: str = "k:test:", ack: Receipt | None = None) -> list[Message]:
    """Messages whose identities may be stored already (a client's key): the careful path."""
    return [Message(t, MOMENT, ident=f"{prefix}{n}", receipt=ack) for n, t in enumerate(texts)]


def bodies(count: int, start: int = 0) -> list[str]:
    return [json.dumps({"n": n}) for n in range(start, start + count)]


def refuse_bad(engine: Engine) -> None:
    """Make the database refuse messages that have a "bad" field: a permanent error."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("ALTER TABLE messages ADD CONSTRAINT refuse_bad CHECK (NOT (payload ? 'bad'))")
        else:
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse_bad BEFORE INSERT ON messages "
                "WHEN json_extract(NEW.payload, '$.bad') IS NOT NULL BEGIN SELECT RAISE(ABORT, 'bad refused'); END"
            )


def lock_sqlite(url: str) -> sqlite3.Connection:
    """Another connection holding SQLite's write lock: every write meets "database is locked".
    Usable from any thread, so whichever thread sees the retries can release it."""
    lock = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")
    return lock
