"""Shutdown as two Events: `stopping` (stop accepting, drain) and `hard_stop` (deadline passed)."""

from __future__ import annotations

import signal
import threading
from types import FrameType


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
        """SIGINT/SIGTERM/SIGHUP only set flags; the main thread does the work. Main thread only.

        The first signal asks for a drain; a second one (an impatient Ctrl-C) ends it now.
        """

        def handler(_signum: int, _frame: FrameType | None) -> None:
            if self.stopping.is_set():
                self.hard_stop.set()
            self.stopping.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGHUP, lambda _signum, _frame: self.reload.set())
