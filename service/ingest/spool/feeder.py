"""The spool feeder thread: moves spooled messages into the bounded memory buffer as it frees room.

The spool absorbs bursts larger than the buffer; this thread feeds committed requests in order
and puts their messages into the buffer, waiting for room like any producer. A request this
process has just committed comes from the writer in memory, as the listener made it (up to the
writer's hand-off bound); any other is read from the file, from the feeder's own connection, a
chunk at a time, and split back into messages. Memory stays bounded by the buffer and the
hand-off, not by the spool.

At start it feeds what a previous run left (recovered rows may already be in the database, so they
are marked `known` and written through the duplicate-skipping path). On stop it keeps feeding
until everything committed has been fed, so a graceful stop leaves an empty spool, unless the
drain deadline passes first: what is not fed by then stays in the file for the next start.

Every row it feeds is first `track`ed with the writer (its message count), so the writer deletes
it once consumers have stored the last of its messages.

Error policy: a read error is logged and retried after a pause (the rows are safe on disk); any
other exception ends the thread, which the service notices.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

from ingest.buffer import Buffer
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
        self.read_rows = 0  # rows read back from the file (the rest came from the writer in memory)

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
        fresh, first_fresh = self._writer.take_fresh(self._fed_seq + 1, self._chunk)
        if fresh:
            rows = [(row.seq, len(row.batch), row.bytes) for row in fresh]
            batch = [message for row in fresh for message in row.batch]
        else:
            up_to = first_fresh - 1 if first_fresh else committed
            try:
                read = spool.read_after(conn, self._fed_seq, up_to, self._chunk)
            except sqlite3.Error as exc:
                log.error("spool %s: read failed, retrying: %s", self._writer.path, exc)
                self._hard_stop.wait(READ_RETRY_S)
                return True
            if not read:  # seqs a failed commit took: no row has them
                self._fed_seq = up_to
                return True
            self.read_rows += len(read)
            rows = [(row.seq, len(row.texts), row.bytes) for row in read]
            batch = self._messages(read)
        self._writer.track(rows)
        for first in range(0, len(batch), self._chunk):  # a request may hold more than the buffer
            if not self._put(batch[first:first + self._chunk]):
                return self._keep(batch[first:])
        self._fed_seq = rows[-1][0]
        return True

    def _messages(self, rows: list[spool.Row]) -> list[Message]:
        """Rows read from the file, as messages: those a previous run left are `known` (they may
        be in the database already)."""
        receipts: dict[str, Receipt] = {}
        batch: list[Message] = []
        for row in rows:
            receipt = self._writer.take_waiting(row.seq) or self._receipt(row, receipts)
            known = row.known or row.seq <= self._recovered_upto
            received_at, seq = row.received_at, row.seq
            batch.extend([  # positional: half the cost of keywords, message by message
                Message(text, received_at, ident or None, known, seq, receipt)
                for text, ident in zip(row.texts, row.idents, strict=True)
            ])
        return batch

    def _put(self, batch: list[Message]) -> bool:
        return self._buffer.put_all_unless(batch, self._hard_stop, WAIT_S)

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
