"""The last line of defence: a chained threading.excepthook, and replacement of dead consumers.

The hook counts and logs every uncaught exception in any thread (SystemExit included, which the
default hook ignores silently) and keeps no reference to it. `check()`, called by the main
thread's loop, replaces consumers that died.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from ingest.consumers import ConsumerThread

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(
        self,
        make_consumer: Callable[[str], ConsumerThread],
        thread_errors: Counter,
        restarts: Counter,
        known_threads: set[str],
    ) -> None:
        self._make_consumer = make_consumer
        self._thread_errors = thread_errors
        self._restarts = restarts
        self._known = known_threads
        self._lock = threading.Lock()  # check() runs on the main thread, alive() on the listener's
        self._consumers: list[ConsumerThread] = []
        self._previous_hook: Callable[[threading.ExceptHookArgs], Any] | None = None

    def __repr__(self) -> str:
        return f"Supervisor(alive={self.alive()}/{len(self._consumers)})"

    def adopt(self, consumers: list[ConsumerThread]) -> None:
        with self._lock:
            self._consumers = list(consumers)

    def consumers(self) -> list[ConsumerThread]:
        with self._lock:
            return list(self._consumers)

    def alive(self) -> int:
        with self._lock:
            return sum(thread.is_alive() for thread in self._consumers)

    def check(self) -> int:
        """Replace every consumer that has died; returns how many were replaced."""
        replaced = 0
        with self._lock:
            for index, thread in enumerate(self._consumers):
                if thread.is_alive() or thread.ident is None or thread.finished:
                    continue
                log.warning("%s is dead; starting a replacement", thread.name)
                fresh = self._make_consumer(thread.name)
                fresh.start()
                self._consumers[index] = fresh
                self._restarts.inc()
                replaced += 1
        return replaced

    def install(self) -> None:
        """Chain our hook in front of the current one (pytest's, in tests)."""
        self._previous_hook = threading.excepthook
        threading.excepthook = self._hook

    def uninstall(self) -> None:
        if self._previous_hook is not None and threading.excepthook == self._hook:
            threading.excepthook = self._previous_hook
        self._previous_hook = None

    def _hook(self, args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread is not None else "unknown"
        self._thread_errors.labels(name if name in self._known else "other").inc()
        log.critical(
            "thread %s died: %s: %s", name, args.exc_type.__name__, args.exc_value,
            exc_info=args.exc_value if args.exc_value is not None else True,
        )
        previous = self._previous_hook
        # The default hook would print the same traceback a second time; any other hook
        # (pytest's, an embedding application's) still gets to see the exception.
        if previous is not None and previous is not threading.__excepthook__:
            previous(args)
