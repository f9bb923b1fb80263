"""The database gate: with a spool, a start while the database is away.

A spool exists for the database's absences, so a process with one starts even when the database
does not answer its start check: the listener accepts into the spool (202 once on disk), the
adopter takes in orphaned spool files, and the consumers wait at this gate. The main loop asks
`tick()` between its supervision checks; the check itself (the start's migration and schema
check) runs on a thread of its own, so a silent database never blocks the supervisor. Once the
check passes the gate opens and storing begins; if the database answers with the wrong schema,
`tick()` says so and the service stops, as it would have at start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from ingest.errors import DatabaseUnreachable, first_line

log = logging.getLogger(__name__)

RETRY_INTERVAL_S = 2.0
LOG_INTERVAL_S = 60.0  # "still waiting" at most this often; every failure in between is the same story


class DatabaseGate:
    def __init__(self, check: Callable[[], None], opened: threading.Event) -> None:
        """`check` raises DatabaseUnreachable while the database does not answer, and any other
        StartupError when it answers wrongly (a schema at another revision)."""
        self._check = check
        self.opened = opened  # consumers wait on it before their first batch
        self._checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db-gate")
        self._attempt: Future[None] | None = None
        self._next_attempt = 0.0
        self._waiting_since: float | None = None
        self._last_log = 0.0

    def close(self) -> None:
        """Left behind, not waited for: a check stuck connecting to a silent database holds no data."""
        self._checker.shutdown(wait=False, cancel_futures=True)

    def wait_for_database(self) -> None:
        """The start's check found the database away (the caller logged why): keep trying from
        the main loop."""
        self._waiting_since = self._last_log = time.monotonic()
        self._next_attempt = self._waiting_since + RETRY_INTERVAL_S

    def tick(self) -> str | None:
        """Between the main loop's waits: None, or why the service must stop (the database
        answered, with the wrong schema)."""
        if self.opened.is_set() or self._waiting_since is None:
            return None
        now = time.monotonic()
        if self._attempt is None:
            if now >= self._next_attempt:
                self._attempt = self._checker.submit(self._check)
            return None
        if not self._attempt.done():
            return None
        attempt, self._attempt = self._attempt, None
        error = attempt.exception()
        if error is None:
            log.info("the database answers after %.0f s: storing begins", now - self._waiting_since)
            self.opened.set()
            return None
        if not isinstance(error, DatabaseUnreachable):
            return first_line(error)
        self._next_attempt = now + RETRY_INTERVAL_S
        if now - self._last_log >= LOG_INTERVAL_S:
            self._last_log = now
            log.warning("still waiting for the database (%.0f s): %s", now - self._waiting_since, first_line(error))
        return None
