"""The spool as one stage of the lifecycle, and `NoSpool`, the stand-in without one.

The service starts and stops stages in an explicit order (service.py); what opening, feeding,
finishing and closing a spool take lives here, so the lifecycle reads the same with or without
`--spool`. Order within the stage: open (claim the file, take stock of what a previous run left)
→ start the writer, the feeder and (with a spool directory) the adopter → at the stop, adopt no
more, take no more and feed everything committed (before the buffer closes) → close once the
consumers are done (their last deletions commit). In a spool directory, a file left empty is
deleted at the close (no empty files pile up); one left with messages is adopted by the next
process on the directory.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from ingest.buffer import Buffer
from ingest.errors import SpoolError, StartupError
from ingest.messages import Message
from ingest.receipts import Ledger
from ingest.spool import directory as spool_directory
from ingest.spool.adopter import SpoolAdopter
from ingest.spool.feeder import SpoolFeeder
from ingest.spool.writer import KEPT_IN_SPOOL, SpoolWriter

log = logging.getLogger(__name__)

JOIN_CHECK_S = 0.5


class SpoolStage:
    # Messages not stored at the stop are kept (in the file), not lost.
    keeps_unstored = True

    def __init__(
        self, writer: SpoolWriter, *, buffer: Buffer, batch_size: int, hard_stop: threading.Event, ledger: Ledger,
        directory: Path | None = None,
    ) -> None:
        self.writer = writer
        self.directory = directory  # --spool DIR: the writer's file is this process's own file in it
        self._buffer = buffer
        self._chunk = batch_size * 2
        self._hard_stop = hard_stop
        self._ledger = ledger
        self.feeder: SpoolFeeder | None = None
        self.adopter: SpoolAdopter | None = None

    def __repr__(self) -> str:
        return f"SpoolStage({self.writer!r}, {self.feeder!r}, {self.adopter!r})"

    @property
    def messages(self) -> int:
        return self.writer.messages

    @property
    def orphaned(self) -> int:
        """Messages in the directory's files no process owns, as the adopter's latest scan saw."""
        return self.adopter.orphaned if self.adopter is not None else 0

    def threads(self) -> list[threading.Thread | None]:
        """Its threads, for health: none of them is replaced if it dies."""
        return [self.writer, self.feeder, self.adopter]

    def open(self) -> None:
        try:
            if self.directory is not None:
                self._make_directory(self.directory)
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
        if self.directory is not None:
            self.adopter = SpoolAdopter(self.writer, self.directory)
            self.adopter.start()

    @staticmethod
    def _make_directory(path: Path) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"spool {path}: cannot create the directory: {exc.strerror}") from None

    def forget(self, batch: list[Message]) -> None:
        """These are in the database now: their rows go with the writer's next commit."""
        self.writer.forget(batch)

    def finish_feeding(self, meanwhile: Callable[[], object]) -> None:
        """Commit what was handed over, then feed all of it before the buffer closes; `meanwhile`
        runs between waits (the supervisor: consumers must keep making room for the feeder). The
        adopter stops first: its last adoption commits, and nothing is adopted only to be left."""
        if self.adopter is not None and self.adopter.ident is not None:
            self.adopter.stop()
            self.adopter.join()
        self.writer.stop_accepting()
        if self.feeder is None or self.feeder.ident is None:
            return
        self.feeder.finish()
        while self.feeder.is_alive():
            meanwhile()
            self.feeder.join(JOIN_CHECK_S)

    def close(self) -> None:
        """After the consumers: their last deletions are committed first."""
        if self.writer.ident is None:  # opened (maybe) but never started: let the file go
            if self.directory is not None and self.writer.claimed and not self.writer.messages:
                spool_directory.remove(self.writer.path)
            self.writer.release()
            return
        self.writer.close()
        self.writer.join()
        if self.directory is not None and not self.writer.messages:
            spool_directory.remove(self.writer.path)  # still under its lock
        self.writer.release()
        self._ledger.give_up_requests(self.writer.orphaned_waiting(), KEPT_IN_SPOOL)
        if self.writer.messages and self.directory is not None:
            log.warning("%d acknowledged messages left in spool %s; the next process on this directory stores them",
                        self.writer.messages, self.writer.path)
        elif self.writer.messages:
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
