"""The spool as one stage of the lifecycle, and `NoSpool`, the stand-in without one.

The service starts and stops stages in an explicit order (service.py); what opening, feeding,
finishing and closing a spool take lives here, so the lifecycle reads the same with or without
`--spool`. Order within the stage: open (claim the file, take stock of what a previous run left)
→ start the writer and the feeder → at the stop, take no more and feed everything committed
(before the buffer closes) → close once the consumers are done (their last deletions commit).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ingest.buffer import Buffer
from ingest.errors import SpoolError, StartupError
from ingest.messages import Message
from ingest.receipts import Ledger
from ingest.spool.feeder import SpoolFeeder
from ingest.spool.writer import KEPT_IN_SPOOL, SpoolWriter

log = logging.getLogger(__name__)

JOIN_CHECK_S = 0.5


class SpoolStage:
    # Messages not stored at the stop are kept (in the file), not lost.
    keeps_unstored = True

    def __init__(
        self, writer: SpoolWriter, *, buffer: Buffer, batch_size: int, hard_stop: threading.Event, ledger: Ledger
    ) -> None:
        self.writer = writer
        self._buffer = buffer
        self._chunk = batch_size * 2
        self._hard_stop = hard_stop
        self._ledger = ledger
        self.feeder: SpoolFeeder | None = None

    def __repr__(self) -> str:
        return f"SpoolStage({self.writer!r}, {self.feeder!r})"

    @property
    def messages(self) -> int:
        return self.writer.messages

    def threads(self) -> list[threading.Thread | None]:
        """Its threads, for health: none of them is replaced if it dies."""
        return [self.writer, self.feeder]

    def open(self) -> None:
        try:
            found = self.writer.open()
        except SpoolError as exc:
            raise StartupError(str(exc)) from None
        if found.messages:
            log.info("spool %s: recovered %d message(s) from a previous run; storing them first",
                     self.writer.path, found.messages)

    def start(self) -> None:
        self.writer.start()
        self.feeder = SpoolFeeder(
            self.writer, self._buffer, chunk=self._chunk, hard_stop=self._hard_stop, ledger=self._ledger
        )
        self.feeder.start()

    def forget(self, batch: list[Message]) -> None:
        """These are in the database now: their rows go with the writer's next commit."""
        self.writer.forget(batch)

    def finish_feeding(self, meanwhile: Callable[[], object]) -> None:
        """Commit what was handed over, then feed all of it before the buffer closes; `meanwhile`
        runs between waits (the supervisor: consumers must keep making room for the feeder)."""
        self.writer.stop_accepting()
        if self.feeder is None or self.feeder.ident is None:
            return
        self.feeder.finish()
        while self.feeder.is_alive():
            meanwhile()
            self.feeder.join(JOIN_CHECK_S)

    def close(self) -> None:
        """After the consumers: their last deletions are committed first."""
        if self.writer.ident is None:
            self.writer.release()  # opened (maybe) but never started: let the file go
            return
        self.writer.close()
        self.writer.join()
        self.writer.release()
        self._ledger.give_up_requests(self.writer.orphaned_waiting(), KEPT_IN_SPOOL)
        if self.writer.messages:
            log.warning("spool %s: %d message(s) stay in the spool; the next start stores them",
                        self.writer.path, self.writer.messages)


class NoSpool:
    """Without --spool: nothing to open, feed or close, and nothing kept past the stop."""

    keeps_unstored = False
    messages = 0

    def threads(self) -> list[threading.Thread | None]:
        return []

    def open(self) -> None:
        pass

    def start(self) -> None:
        pass

    def forget(self, batch: list[Message]) -> None:
        pass

    def finish_feeding(self, meanwhile: Callable[[], object]) -> None:
        pass

    def close(self) -> None:
        pass
