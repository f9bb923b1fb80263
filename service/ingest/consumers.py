"""Consumer threads: take a batch from the buffer, write it, tell waiting clients.

Error policy, in two levels (the seed's question, answered here):
1. Expected errors are handled inside `step()` by the store: retried or dead-lettered.
2. Anything else is logged with the thread name, the batch goes back to the head of the
   buffer, and the exception is re-raised so the thread dies loudly; the excepthook counts it
   and the supervisor starts a replacement.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from ingest.buffer import Buffer
from ingest.db.store import Store, WriteResult
from ingest.errors import IngestError, TransientStoreError
from ingest.messages import Message
from ingest.metrics import Metrics
from ingest.receipts import Ledger

log = logging.getLogger(__name__)


class ConsumerThread(threading.Thread):
    """One writer. Non-daemon: it may hold a batch that is not yet in the database."""

    def __init__(
        self,
        name: str,
        *,
        buffer: Buffer,
        store: Store,
        metrics: Metrics,
        ledger: Ledger,
        batch_size: int,
        linger_s: float,
        hard_stop: threading.Event,
        startup: threading.Barrier | None = None,
        database_open: threading.Event | None = None,
        idle_wait_s: float = 0.5,
        after_commit: Callable[[list[Message], WriteResult], None] | None = None,
    ) -> None:
        super().__init__(name=name, daemon=False)
        self._buffer = buffer
        self._store = store
        self._metrics = metrics
        self._ledger = ledger
        self._batch_size = batch_size
        self._linger_s = linger_s
        self._hard_stop = hard_stop
        self._startup = startup
        self._database_open = database_open  # the database gate (db/gate.py); None: always open
        self._idle_wait_s = idle_wait_s
        self._after_commit = after_commit  # told of messages now in the database (the spool deletes them)
        self.startup_error: str | None = None
        self.finished = False  # True when run() returned on purpose, not by dying
        # The batch being written. The main thread may take it (abandon) when this thread is
        # still blocked in the database past the drain deadline; whoever takes it accounts for it.
        self._held_lock = threading.Lock()
        self._held: list[Message] = []

    def __repr__(self) -> str:
        return f"ConsumerThread({self.name}, alive={self.is_alive()}, holding={len(self._held)})"

    def run(self) -> None:
        if (self._startup is None or self._prepare(self._startup)) and self._wait_for_database():
            while not self._hard_stop.is_set():
                if not self.step() and self._buffer.drained():
                    break
        self.finished = True

    def _wait_for_database(self) -> bool:
        """At the gate of a service that started while the database was away (with a spool, which
        keeps what is accepted meanwhile). False: the service stopped before it ever answered."""
        if self._database_open is None:
            return True
        while not self._database_open.wait(self._idle_wait_s):
            if self._hard_stop.is_set() or self._buffer.drained():
                return False
        return True

    def _prepare(self, startup: threading.Barrier) -> bool:
        """Check the database, then meet the main thread; a failure aborts the start."""
        try:
            self._store.check()
        except IngestError as exc:
            self.startup_error = str(exc)
            log.error("%s cannot start: %s", self.name, exc)
            startup.abort()
            return False
        try:
            startup.wait()
        except threading.BrokenBarrierError:
            return False  # another party failed; the main thread reports why
        return True

    def step(self) -> bool:
        """Take and write one batch; False when there was nothing to take."""
        batch = self._buffer.take(self._batch_size, self._linger_s, self._idle_wait_s)
        if not batch:
            return False
        with self._held_lock:
            self._held = batch
        try:
            self._metrics.batch_size.observe(len(batch))
            result = self._store.write(batch)
        except TransientStoreError as exc:
            # Only the drain deadline ends retries: these messages cannot be stored now.
            # Spooled ones are not lost: they stay in the spool file for the next start.
            if not self._release():
                return True  # abandoned meanwhile: the main thread accounted for the batch
            lost = sum(1 for m in batch if m.seq is None)
            self._metrics.lost.inc(lost)
            log.error("%s: %d message(s) not stored at the drain deadline (%d lost): %s",
                      self.name, len(batch), lost, exc)
            self._ledger.given_up(batch, str(exc))
            return True
        except BaseException:
            # The excepthook logs the traceback and counts the death; say what happened to the data.
            if self._release():
                log.error("%s died holding %d message(s); handing them back", self.name, len(batch))
                self._buffer.requeue(batch)
            raise
        self._release()
        # Committed: from here on a failure must not hand the batch back, or it would be
        # written twice (and messages without an identity would be stored twice).
        try:
            self._account(batch, result)
        except BaseException:
            log.error("%s died after committing %d message(s); they are stored", self.name, len(batch))
            self._ledger.given_up(batch, "stored, but the service failed after the commit; see its log")
            raise
        return True

    def _release(self) -> list[Message]:
        """Let go of the held batch; empty if the main thread took it first."""
        with self._held_lock:
            batch, self._held = self._held, []
        return batch

    def abandon(self) -> list[Message]:
        """Take the batch this thread holds (the main thread, when it gives up waiting for it)."""
        return self._release()

    def _account(self, batch: list[Message], result: WriteResult) -> None:
        committed = time.time()
        # A request's messages share received_at: one observation per request, with its count.
        for received_at, count in Counter(m.received_at for m in result.stored).items():
            self._metrics.message_latency.observe(committed - received_at, count)
        self._metrics.stored.inc(len(result.stored))
        self._metrics.duplicates.inc(len(result.duplicates))
        if self._after_commit is not None:
            self._after_commit(batch, result)
        # Last: a waiting client hears of its commit once everything else is done with it.
        self._ledger.committed(result.stored, result.duplicates, result.dead)
