"""The spool feeder thread: moves spooled messages into the bounded memory buffer as it frees room.

The spool absorbs bursts larger than the buffer; this thread reads committed rows in order, from
its own connection, and puts them into the buffer, waiting for room like any producer. Memory
stays bounded by the buffer, not by the spool: rows are read a chunk at a time, when they fit.

At start it feeds what a previous run left (recovered rows may already be in the database, so they
are marked `known` and written through the duplicate-skipping path). On stop it keeps feeding
until everything committed has been fed, so a graceful stop leaves an empty spool, unless the
drain deadline passes first: what is not fed by then stays in the file for the next start.

Error policy: a read error is logged and retried after a pause (the rows are safe on disk); any
other exception ends the thread, which the service notices.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

from ingest.buffer import Buffer
from ingest.errors import QueueFull, ShuttingDown
from ingest.messages import Message, Receipt
from ingest.receipts import Ledger
from ingest.spool import file as spool
from ingest.spool.writer import KEPT_IN_SPOOL, SpoolWriter

log = logging.getLogger(__name__)

WAIT_S = 0.5
READ_RETRY_S = 1.0


class SpoolFeeder(threading.Thread):
    def __init__(
        self, writer: SpoolWriter, buffer: Buffer, *, chunk: int, hard_stop: threading.Event, ledger: Ledger
    ) -> None:
        super().__init__(name="spool-feeder", daemon=False)
        self._writer = writer
        self._buffer = buffer
        self._ledger = ledger
        self._chunk = max(1, min(chunk, buffer.capacity))
        self._hard_stop = hard_stop
        self._recovered_upto = writer.recovered.last_seq
        self._fed_seq = writer.recovered.first_seq - 1 if writer.recovered.messages else writer.committed_seq
        self._finishing = threading.Event()

    def __repr__(self) -> str:
        return f"SpoolFeeder(fed_seq={self._fed_seq})"

    def finish(self) -> None:
        """Feed what is committed, then end (called once the writer takes no more submits)."""
        self._finishing.set()

    def run(self) -> None:
        conn = spool.open_spool(self._writer.path, self._writer.sync, create=False)
        try:
            while not self._hard_stop.is_set():
                committed = self._writer.wait_committed(self._fed_seq, WAIT_S)
                if committed > self._fed_seq:
                    if not self._feed(conn, committed):
                        return
                elif self._all_fed():
                    return
        finally:
            conn.close()

    def _all_fed(self) -> bool:
        """Finishing, no commit is coming, and every committed row has been fed."""
        finishing = self._finishing.is_set() and not self._writer.accepting()
        return finishing and self._writer.committed_seq <= self._fed_seq

    def _feed(self, conn: sqlite3.Connection, committed: int) -> bool:
        """One chunk into the buffer; False when the buffer is closed."""
        try:
            rows = spool.read_after(conn, self._fed_seq, committed, self._chunk)
        except sqlite3.Error as exc:
            log.error("spool %s: read failed, retrying: %s", self._writer.path, exc)
            self._hard_stop.wait(READ_RETRY_S)
            return True
        receipts: dict[str, Receipt] = {}
        batch = [
            Message(
                row.payload, row.received_at,
                ident=row.ident, known=row.known or row.seq <= self._recovered_upto, seq=row.seq,
                receipt=self._writer.take_waiting(row.seq) or self._receipt(row, receipts),
            )
            for row in rows
        ]
        while True:
            try:
                self._buffer.put_all(batch, time.monotonic() + WAIT_S)
                break
            except QueueFull:
                if self._hard_stop.is_set():
                    return self._keep(batch)
            except ShuttingDown:
                return self._keep(batch)
        self._fed_seq = rows[-1].seq
        return True

    def _receipt(self, row: spool.Row, seen: dict[str, Receipt]) -> Receipt | None:
        """The receipt the listener opened; for a row a previous run left, a new one that only
        counts towards the database's row (this process never accepted that request)."""
        if row.request is None:
            return None
        receipt = seen.get(row.request)
        if receipt is None:
            receipt = None if row.seq <= self._recovered_upto else self._ledger.get(row.request)
            if receipt is None:
                receipt = Receipt(row.request, row.accepted or 0, row.received_at, client=row.client)
            seen[row.request] = receipt
        return receipt

    def _keep(self, batch: list[Message]) -> bool:
        """Not fed before the end: the rows stay in the spool; waiting clients hear it now."""
        self._ledger.given_up(batch, KEPT_IN_SPOOL)
        return False
