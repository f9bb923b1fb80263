"""A spool row is a request: it stays until the last of its messages is in the database.

The writer thread on a real file, driven the way the feeder and the consumers drive it (take the
committed request, track it, forget what was stored), with no database in the way.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from ingest.buffer import Buffer
from ingest.errors import SpoolError, SpoolUnavailable
from ingest.http.identity import Generator, from_key
from ingest.messages import Message, Receipt
from ingest.receipts import Ledger
from ingest.spool import file as spool
from ingest.spool.feeder import SpoolFeeder
from ingest.spool.writer import SpoolWriter
from support.waiting import wait_until


def _rows(path: Path) -> list[tuple[int, int]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT seq, messages FROM spool ORDER BY seq").fetchall()
    finally:
        conn.close()


@pytest.fixture
def writer(tmp_path):
    writer = SpoolWriter(tmp_path / "spool.db", sync="normal", max_bytes=100 * 2**20)
    writer.open()
    writer.start()
    yield writer
    writer.stop_accepting()
    writer.close()
    writer.join(30)
    writer.release()


def _accepted(writer: SpoolWriter, request_id: str, count: int) -> list[Message]:
    receipt = Receipt(request_id, count, 1.0)
    batch = [Message(f'{{"n": {n}}}', 1.0, ident=f"g:t:{request_id}:{n}", receipt=receipt) for n in range(count)]
    writer.submit(batch).result(10)
    return batch


def _commit_after(writer: SpoolWriter, step) -> None:
    commits = writer.commits
    step()
    wait_until(lambda: writer.commits > commits, 10, "the writer's next commit")


def test_a_partly_stored_request_stays_until_its_last_message_is_stored(writer) -> None:
    first = _accepted(writer, "a", 3)
    second = _accepted(writer, "b", 2)
    assert _rows(writer.path) == [(1, 3), (2, 2)]  # a row a request
    fresh, _ = writer.take_fresh(1, 100)
    assert [(row.seq, row.batch) for row in fresh] == [(1, first), (2, second)]
    writer.track([(row.seq, len(row.batch), row.bytes) for row in fresh])

    _commit_after(writer, lambda: writer.forget(first[:2] + second[:1]))
    assert _rows(writer.path) == [(1, 3), (2, 2)]
    assert writer.messages == 2
    _commit_after(writer, lambda: writer.forget(second[1:]))  # stored, or dead-lettered: forgotten alike
    assert _rows(writer.path) == [(1, 3)]
    _commit_after(writer, lambda: writer.forget(first[2:]))
    assert _rows(writer.path) == []
    assert (writer.messages, writer.bytes) == (0, 0)


def test_past_the_hand_off_bound_requests_are_read_back_from_the_file(tmp_path) -> None:
    writer = SpoolWriter(tmp_path / "spool.db", sync="normal", max_bytes=10**6, hand_off=3)
    writer.open()
    writer.start()
    try:
        kept = _accepted(writer, "a", 2)
        _accepted(writer, "b", 2)  # over the bound: in the file only
        fresh, first_fresh = writer.take_fresh(1, 100)
        assert [row.batch for row in fresh] == [kept] and first_fresh == 0
        assert writer.take_fresh(2, 100) == ([], 0)
        conn = spool.open_spool(writer.path, "normal", create=False)
        try:
            (row,) = spool.read_after(conn, 1, writer.committed_seq, 100)
        finally:
            conn.close()
        assert (row.seq, row.request, row.texts, row.idents) == (
            2, "b", ['{"n": 0}', '{"n": 1}'], ["g:t:b:0", "g:t:b:1"]
        )
    finally:
        writer.close()
        writer.join(30)
        writer.release()


class _CountingLoop(asyncio.SelectorEventLoop):
    """A real loop that counts the wake-ups other threads ask of it."""

    def __init__(self) -> None:
        super().__init__()
        self.woken = 0

    def call_soon_threadsafe(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.woken += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def test_the_requests_of_one_commit_wake_their_loop_once(tmp_path) -> None:
    """The listener's futures are settled by one callback a commit, not one a request; a waiter
    whose handler went away (cancelled) does not keep the others from their answer."""
    writer = SpoolWriter(tmp_path / "spool.db", sync="normal", max_bytes=10**6)
    writer.open()
    loop = _CountingLoop()

    async def accept() -> list[asyncio.Future[None]]:
        futures = [loop.create_future() for _ in range(5)]
        for n, future in enumerate(futures):  # queued before the thread runs: one commit takes them all
            writer.submit_on_loop([Message(f'{{"n": {n}}}', 1.0, ident=f"g:t:{n}")], future)
        futures[2].cancel()
        writer.start()
        await asyncio.wait_for(asyncio.gather(*futures[:2], *futures[3:]), 10)
        return futures

    try:
        futures = loop.run_until_complete(accept())
        assert loop.woken == 1 and writer.commits == 1
        assert [f.cancelled() for f in futures] == [False, False, True, False, False]
        assert [seq for seq, _ in _rows(writer.path)] == [1, 2, 3, 4, 5]  # the cancelled one is on disk too
    finally:
        writer.close()
        writer.join(30)
        writer.release()
        loop.close()


def test_a_failed_commit_answers_every_waiting_coroutine(writer) -> None:
    """SpoolUnavailable reaches each request of a failed commit on the listener's loop (503)."""
    lock = sqlite3.connect(writer.path, isolation_level=None)

    async def refused() -> list[BaseException | None]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(3)]
        for n, future in enumerate(futures):
            writer.submit_on_loop([Message(f'{{"n": {n}}}', 1.0, ident=f"g:t:refused:{n}")], future)
        return await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)

    try:
        lock.execute("BEGIN IMMEDIATE")
        outcomes = asyncio.run(refused())
        assert [type(outcome) for outcome in outcomes] == [SpoolUnavailable] * 3
        assert writer.messages == 0
    finally:
        lock.close()


def test_a_commit_of_many_rows_writes_each_once_in_order_and_deletes_runs(tmp_path) -> None:
    """Rows go in multi-row statements (at most 32 rows, at most STATEMENT_BYTES a statement but
    for a larger row alone); deletes go by runs of consecutive seqs."""
    conn = spool.open_spool(tmp_path / "spool.db", "normal")
    big = "x" * spool.STATEMENT_BYTES
    sizes = [10] * 45 + [spool.STATEMENT_BYTES] + [10] * 3 + [spool.STATEMENT_BYTES // 2] * 3
    rows = [(seq, 1.0, 0, None, None, None, 1, size, f"g:{seq}", "1", big[:size], str(size))
            for seq, size in enumerate(sizes, start=1)]
    try:
        conn.execute("BEGIN")
        spool.insert(conn, rows)
        conn.execute("COMMIT")
        stored = conn.execute("SELECT seq, bytes, idents, texts FROM spool ORDER BY seq").fetchall()
        assert stored == [(seq, size, f"g:{seq}", big[:size]) for seq, size in enumerate(sizes, start=1)]
        spool.delete(conn, [7, 3, 4, 5, 40, 41, 52, 1])
        left = [seq for (seq,) in conn.execute("SELECT seq FROM spool ORDER BY seq")]
        assert left == [seq for seq in range(1, 53) if seq not in {1, 3, 4, 5, 7, 40, 41, 52}]
    finally:
        conn.close()


_TEXTS = {
    "one": ['{"a": "x"}'],
    "lines": ['{"n": 1}', '{"s": "a,b"}', '{"s": "é😀"}', "{}"],
    "a newline in one": ['{"n": 1}', '{"s":\n"x"}', "{}"],
    "empty and odd": ["", "1,2", "\n\u0000", "", "\r"],
}
_IDENTS = {
    "generated": lambda n: Generator().take(n),
    "keyed": lambda n: from_key("k%:0", n),
    "field": lambda n: [f"f:{i},{i}" for i in range(n)],
    "none": lambda n: [""] * n,
    "a field with a newline": lambda n: [f"f:x\n{i}" for i in range(n)],
}


@pytest.mark.parametrize("texts", _TEXTS.values(), ids=_TEXTS.keys())
@pytest.mark.parametrize("kind", _IDENTS)
def test_a_packed_request_unpacks_exactly(texts, kind) -> None:
    idents = _IDENTS[kind](len(texts))
    packed = spool.pack(texts, idents, "req-1")
    assert spool.unpack(packed.texts, packed.text_lengths, len(texts)) == texts
    assert spool.unpack(packed.idents, packed.ident_lengths, len(texts)) == idents
    # Its share of the bound counts every text and identity in full, however it is kept.
    assert packed.bytes == spool.request_bytes(sum(map(len, texts)), sum(map(len, idents)), "req-1", len(texts))


def test_strings_without_a_newline_are_kept_as_lines() -> None:
    texts, idents = ['{"n": 1}', '{"n": 2}', '{"n": 3}'], Generator().take(3)
    packed = spool.pack(texts, idents, "")
    assert (packed.texts, packed.text_lengths) == ("\n".join(texts), spool.BY_NEWLINE)
    assert (packed.idents, packed.ident_lengths) == ("\n".join(idents), spool.BY_NEWLINE)


def test_a_row_that_does_not_add_up_is_an_error_not_wrong_messages() -> None:
    with pytest.raises(SpoolError, match="2 lines for 3 messages"):
        spool.unpack("a\nb", spool.BY_NEWLINE, 3)
    with pytest.raises(SpoolError, match="lengths do not match"):
        spool.unpack("abc", "1,1", 3)


def test_a_failed_commit_leaves_a_gap_the_feeder_steps_over(writer) -> None:
    """A commit that fails (here: another connection holds the write lock past SQLite's 5 s busy
    wait) answers 503 and uses its seq; the next request is committed and fed all the same."""
    hard_stop = threading.Event()
    buffer = Buffer(100)
    feeder = SpoolFeeder(writer, buffer, chunk=100, hard_stop=hard_stop, ledger=Ledger())
    feeder.start()
    lock = sqlite3.connect(writer.path, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        refused = writer.submit([Message('{"n": 0}', 1.0, ident="g:t:refused")])
        with pytest.raises(SpoolUnavailable):
            refused.result(30)
        lock.execute("ROLLBACK")
        accepted = _accepted(writer, "after", 2)
        taken = buffer.take(10, 0.0, 10.0)
        assert taken == accepted and [m.seq for m in taken] == [2, 2]
        assert writer.messages == 2
    finally:
        lock.close()
        hard_stop.set()
        buffer.close()
        feeder.join(30)


def test_an_emptied_spool_gives_its_pages_back(writer) -> None:
    """After a burst of 12 MiB is stored, the file is no larger than a few pages: its size
    follows the backlog, not what went through it."""
    text = '{"pad": "' + "x" * 100_000 + '"}'
    batches = []
    for n in range(120):
        batch = [Message(text, 1.0, ident=f"g:t:{n}", receipt=Receipt(f"r{n}", 1, 1.0))]
        batches.append(batch)
        writer.submit(batch).result(10)
    assert writer.path.stat().st_size + Path(f"{writer.path}-wal").stat().st_size > 12 * 2**20
    fresh, _ = writer.take_fresh(1, 1000)
    writer.track([(row.seq, len(row.batch), row.bytes) for row in fresh])
    assert len(fresh) == 120
    _commit_after(writer, lambda: writer.forget([m for batch in batches for m in batch]))
    assert _rows(writer.path) == []
    wal = Path(f"{writer.path}-wal")
    wait_until(lambda: writer.path.stat().st_size < 2**20 and wal.stat().st_size < 2**20, 10,
               "the free pages given back")


def test_every_spool_connection_keeps_a_small_page_cache(tmp_path) -> None:
    """The writer's and the feeder's pages are in the operating system's cache already; SQLite's
    default 2 MiB a connection doubled them in the process (peak RSS 96 against 93 MiB measured)."""
    path = tmp_path / "spool.db"
    for conn in (spool.open_spool(path), spool.open_spool(path, create=False, writable=False)):
        try:
            assert conn.execute("PRAGMA cache_size").fetchone()[0] == -spool.CACHE_KIB
        finally:
            conn.close()
    assert spool.CACHE_KIB <= 512
