"""The stream as one stage of the lifecycle (service.py), in the place of the spool's.

Open: check the stream (and, for writers, its consumer) is as `ingest stream init` made it, and
that a whole request fits the servers' max_payload; one line and exit 1 otherwise. Start: the
feeder (writers only: --consumers > 0). Stop: fetch no more before the buffer closes; once the
consumers are done, send the last acks and disconnect. What no consumer stored is not lost: it
was never acked, so the stream delivers it again, to this writer's next start or another.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence

from ingest.buffer import Buffer
from ingest.messages import Message
from ingest.receipts import Ledger
from ingest.stream import admin
from ingest.stream.feeder import StreamFeeder
from ingest.stream.spec import StreamSpec

JOIN_CHECK_S = 0.5
KEPT_IN_STREAM = "not stored before shutdown; kept in the stream, for a writer to store"


class StreamStage:
    keeps_unstored = True  # unacked requests stay in the stream
    messages = 0

    def __init__(
        self, spec: StreamSpec, *, writers: bool, buffer: Buffer, ledger: Ledger, hard_stop: threading.Event,
        database_failing: Callable[[], bool],
        new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    ) -> None:
        self.spec = spec
        self._new_loop = new_loop
        self._writers = writers
        self._buffer = buffer
        self._ledger = ledger
        self._hard_stop = hard_stop
        self._database_failing = database_failing
        self.feeder: StreamFeeder | None = None

    def __repr__(self) -> str:
        return f"StreamStage({self.spec.name}, {self.feeder!r})"

    def threads(self) -> list[threading.Thread | None]:
        return [self.feeder]

    def open(self) -> None:
        admin.check(self.spec, writer=self._writers)

    def start(self) -> None:
        if not self._writers:
            return
        self.feeder = StreamFeeder(self.spec, self._buffer, ledger=self._ledger, hard_stop=self._hard_stop,
                                   database_failing=self._database_failing, new_loop=self._new_loop)
        self.feeder.start()

    def forget(self, batch: list[Message]) -> None:
        """The spool's hook; the stream's is `settled`, which needs each message's outcome."""

    def settled(self, stored: Sequence[Message], duplicates: Sequence[Message], dead: Sequence[Message]) -> None:
        if self.feeder is not None:
            self.feeder.settled(stored, duplicates, dead)

    def finish_feeding(self, meanwhile: Callable[[], object]) -> None:
        feeder = self.feeder
        if feeder is None or feeder.ident is None:
            return
        feeder.finish()
        while not feeder.fetching_done.wait(JOIN_CHECK_S):
            meanwhile()

    def close(self) -> None:
        feeder = self.feeder
        if feeder is None or feeder.ident is None:
            return
        feeder.close()
        feeder.join()
