"""Shutdown as two Events: `stopping` (stop accepting, drain) and `hard_stop` (deadline passed)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import NoReturn

log = logging.getLogger(__name__)

EXIT_GRACE_S = 1.0


class Shutdown:
    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.hard_stop = threading.Event()
        self.reload = threading.Event()  # SIGHUP: read the token file again
        self._deadline: threading.Timer | None = None

    def __repr__(self) -> str:
        return f"Shutdown(stopping={self.stopping.is_set()}, hard_stop={self.hard_stop.is_set()})"

    def start_deadline(self, drain_timeout_s: float) -> None:
        """After `drain_timeout_s`, set hard_stop: consumers stop retrying and give up."""
        # Daemon: the timer holds no data, and must not keep a finished process alive.
        self._deadline = threading.Timer(drain_timeout_s, self.hard_stop.set)
        self._deadline.name = "drain-deadline"
        self._deadline.daemon = True
        self._deadline.start()

    def cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()

    def install_signal_handlers(self) -> None:
        """The signals' meaning (on_signals) as this process's Events. Main thread only."""

        def stop(again: bool) -> None:
            if again or self.stopping.is_set():  # also past a stop the service began itself
                self.hard_stop.set()
            self.stopping.set()

        on_signals(stop=stop, reload=self.reload.set)


def on_signals(*, stop: Callable[[bool], None], reload: Callable[[], None]) -> None:
    """The one place that says what signals mean to ingest, for `serve` and for `--workers`'
    parent alike: SIGTERM or SIGINT asks for a drain, `stop(False)`; another one (an impatient
    Ctrl-C) ends the drain now, `stop(True)`; SIGHUP reads the token file again, `reload()`.
    The callbacks only set flags or pass the signal on: the main thread does the work, since a
    handler that logged or joined could deadlock on a lock the interrupted code holds."""
    received = 0

    def on_stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal received
        received += 1
        stop(received > 1)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: reload())


def exit_process(code: int) -> NoReturn:
    """Exit with `code` once the service has stopped, even if a thread is still blocked.

    Python waits for every non-daemon thread before a process ends. After a stop, the only ones
    left are those a silent database holds (a consumer left behind at the drain deadline, a
    receipt lookup stuck connecting): waiting for them would let the database, not the drain
    deadline, decide when the process ends. They hold nothing the stop has not accounted for.
    """
    until = time.monotonic() + EXIT_GRACE_S
    for thread in _others():
        thread.join(max(0.0, until - time.monotonic()))
    stuck = [thread.name for thread in _others()]
    if not stuck:
        sys.exit(code)
    log.warning("exiting without %d thread(s) still blocked in the database: %s", len(stuck), ", ".join(stuck))
    logging.shutdown()  # flush the log: os._exit skips every exit handler
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _others() -> list[threading.Thread]:
    main = threading.main_thread()
    return [t for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]
