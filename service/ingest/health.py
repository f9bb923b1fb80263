"""Liveness and readiness, read by /healthz and /readyz from the listener's thread.

Healthy: every thread the pipeline needs is alive. Ready: healthy enough to be sent traffic now,
or the reason it is not (starting, stopping, the database silent or failing, sibling workers
still starting), said in /readyz's body so that an operator reads why without the log.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from ingest.db.store import Store
from ingest.supervisor import Supervisor


class EventLike(Protocol):
    """threading.Event or multiprocessing's Event (a different class, the same is_set)."""

    def is_set(self) -> bool: ...


class Health:
    def __init__(
        self,
        *,
        spool_threads: Callable[[], list[threading.Thread | None]],
        supervisor: Supervisor,
        consumers: int,
        store: Store,
        stopping: threading.Event,
        siblings_started: EventLike | None,
        stream_unreachable: Callable[[], str | None] | None = None,
    ) -> None:
        self._listener: threading.Thread | None = None  # watch()ed once built: it needs the routes, which need this
        self._spool_threads = spool_threads  # the spool's writer and feeder, once built
        self._supervisor = supervisor
        self._consumers = consumers
        self._store = store
        self._stopping = stopping
        self._siblings_started = siblings_started
        self._stream_unreachable = stream_unreachable  # --buffer nats://: why the stream does not answer
        self.started = threading.Event()  # set once start() has returned

    def watch(self, listener: threading.Thread) -> None:
        self._listener = listener

    def dead_thread(self) -> str | None:
        """The name of a started pipeline thread that died, which no supervisor replaces."""
        for thread in [self._listener, *self._spool_threads()]:
            if thread is not None and thread.ident is not None and not thread.is_alive():
                return thread.name
        return None

    def healthy(self) -> bool:
        listening = self._listener is not None and self._listener.is_alive()
        return listening and self._supervisor.alive() == self._consumers and self.dead_thread() is None

    def not_ready(self) -> str | None:
        """None when ready; otherwise why not, in a few words."""
        if not self.started.is_set():
            return "starting"
        if self._stopping.is_set():
            return "stopping"
        if self._stream_unreachable is not None and (why := self._stream_unreachable()) is not None:
            return f"stream unreachable: {why}"
        # A listener only (--consumers 0) writes nothing: the stream keeps its requests meanwhile.
        if self._store.database_error is not None and self._consumers > 0:
            return f"database unreachable: {self._store.database_error}"
        if self._siblings_started is not None and not self._siblings_started.is_set():
            return "waiting for the other worker processes to start"
        return None

    def ready(self) -> bool:
        return self.not_ready() is None
