"""The main loop's chores between its supervision checks, none of which may block it.

The main thread is the supervisor: if it waits on the database, nothing replaces dead consumers,
the drain deadline goes unenforced and SIGTERM is never acted on. So every chore that talks to the
database runs on a thread of its own with a deadline, and the main loop only looks at the result:
- the readiness probe (`SELECT 1` on a connection of its own, so a busy pool never looks like a
  dead database), every PROBE_INTERVAL_S; one that has not answered in PROBE_TIMEOUT_S makes
  /readyz say 503 until one answers;
- the dead-letters count, for its gauge;
- cutting the connections of database calls that ran past the statement timeout (pool.py);
- SIGHUP: read the token file again.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

from ingest.db.pool import ConnectionPool
from ingest.db.store import Store
from ingest.errors import first_line
from ingest.http.auth import Tokens
from ingest.metrics import Metrics
from ingest.shutdown import Shutdown

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 2.0
PROBE_TIMEOUT_S = 3.0  # also the probe connection's statement timeout
DEAD_LETTER_COUNT_INTERVAL_S = 15.0
NO_ANSWER = f"no answer to a probe within {PROBE_TIMEOUT_S:.0f}s"


class Chores:
    def __init__(
        self,
        *,
        store: Store,
        pool: ConnectionPool,
        probe_pool: ConnectionPool,
        metrics: Metrics,
        shutdown: Shutdown,
        tokens: Tokens | None,
        lookups: ThreadPoolExecutor,
    ) -> None:
        self._store = store
        self._pool = pool
        self._probe_pool = probe_pool
        self._metrics = metrics
        self._shutdown = shutdown
        self._tokens = tokens
        self._lookups = lookups
        # One thread for the probe alone: a probe stuck in a silent database holds nothing else up.
        self._prober = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db-probe")
        self._probe: Future[None] | None = None
        self._last_probe = -PROBE_INTERVAL_S  # when the latest probe was sent
        self._count: Future[int] | None = None
        self._last_count = -DEAD_LETTER_COUNT_INTERVAL_S

    def tick(self) -> None:
        """One round of chores; returns at once whatever the database does."""
        self.cut_overdue()
        if self._shutdown.reload.is_set():
            self._shutdown.reload.clear()
            self._reload()
        now = time.monotonic()
        self._watch_probe(now)
        if now - self._last_count >= DEAD_LETTER_COUNT_INTERVAL_S:
            self._count_dead_letters()
            self._last_count = now

    def cut_overdue(self) -> None:
        self._metrics.db_calls_cut.inc(self._pool.cut_overdue() + self._probe_pool.cut_overdue())

    def interrupt(self) -> None:
        """Past the drain deadline: cut every connection in use, the probe's too."""
        self._metrics.db_calls_cut.inc(self._pool.interrupt() + self._probe_pool.interrupt())

    def close(self) -> None:
        """Leave a probe stuck in a silent database behind: it holds no data, and its connection
        is cut (interrupt) or bounded by the connect timeout."""
        self._prober.shutdown(wait=False, cancel_futures=True)
        self._probe_pool.dispose()

    # -- the readiness probe -------------------------------------------------------------------

    def _watch_probe(self, now: float) -> None:
        if self._probe is not None and not self._probe.done():
            if now - self._last_probe >= PROBE_TIMEOUT_S and self._store.database_error is None:
                self._store.database_error = NO_ANSWER
                log.warning("database unreachable: %s", self._store.database_error)
            return
        if now - self._last_probe >= PROBE_INTERVAL_S:
            self._last_probe = now
            self._probe = self._prober.submit(self._probe_pool.ping)
            self._probe.add_done_callback(self._probed)

    def _probed(self, probe: Future[None]) -> None:
        if probe.cancelled():
            return
        exc = probe.exception()
        if exc is None:
            if self._store.database_error is not None:
                log.info("database reachable again")
            self._store.database_error = None
            return
        error = first_line(exc)
        if self._store.database_error in (None, NO_ANSWER):  # log a change of state, not every probe
            log.warning("database unreachable: %s", error)
        self._store.database_error = error

    # -- the dead-letters gauge ----------------------------------------------------------------

    def _count_dead_letters(self) -> None:
        """One count at a time; the gauge keeps its last value while none answers."""
        if self._count is not None and not self._count.done():
            return
        self._count = self._lookups.submit(self._store.count_dead_letters)
        self._count.add_done_callback(self._counted_dead_letters)

    def _counted_dead_letters(self, counting: Future[int]) -> None:
        if counting.cancelled():
            return
        exc = counting.exception()
        if exc is None:
            self._metrics.dead_letters_waiting.set(counting.result())
        else:
            log.warning("could not count dead letters: %s", first_line(exc))

    # -- SIGHUP --------------------------------------------------------------------------------

    def _reload(self) -> None:
        """Read the token file again; a bad file keeps the old tokens (auth.py logs why)."""
        if self._tokens is None:
            log.info("SIGHUP: nothing to reload (no --auth-tokens)")
            return
        if self._tokens.reload():
            self._metrics.add_clients(self._tokens.names())
