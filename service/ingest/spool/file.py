"""The spool file: accepted requests on local disk until the database has their messages.

A SQLite file in WAL mode (a real embedded engine, no home-made log format). One row a request,
in acceptance order (`seq`): its validated texts and their identities, each list kept as one
string (`pack`), so writing, reading back and deleting a request costs three statements whatever
its size, and making and splitting its strings a few calls in C. A `meta` table names the format
and its version, so a foreign or newer file is refused instead of being reset. Only the spool
writer thread writes; the feeder reads through a connection of its own.

Opening checks the file before writing anything to it: a damaged, foreign or unknown-version file
is a SpoolError naming the file and what is wrong, and the file is left as it was. An older file
is upgraded when opened for writing: each row it holds becomes a one-message row.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast
from urllib.parse import quote

from ingest.errors import SpoolError
from ingest.vocabulary import SPOOL_SYNC_MODES

FORMAT = "ingest-spool"
# 2: each row names its request and the request's size, for receipts; 3: its client;
# 4: one row a request (its texts and identities joined), not one a message; 5: the lengths column
# may instead say that the strings are joined by newlines (BY_NEWLINE).
VERSION = 5
SQLITE_MAGIC = b"SQLite format 3\x00"
# What a request costs on disk beyond its texts and identities: seq, received_at, counts and page
# overhead, roughly; and each message's share of the two length lists.
ROW_OVERHEAD_BYTES = 32
MESSAGE_OVERHEAD_BYTES = 8
# The WAL file is cut back to this after a checkpoint, so a burst does not leave it large.
WAL_LIMIT_BYTES = 16 * 1024 * 1024
# Each connection's page cache (SQLite's default is 2 MiB). The writer appends and the feeder reads
# what was just written, both from the operating system's cache: a large one of our own only
# doubles those pages in the process (issue 18: RSS with a spool within 10 MiB of memory mode).
CACHE_KIB = 256

COLUMNS = ("seq", "received_at", "known", "request", "accepted", "client", "messages", "bytes",
           "idents", "ident_lengths", "texts", "text_lengths")
_BYTES = COLUMNS.index("bytes")
# A row of several messages keeps each list (texts, identities) joined by newlines when none of
# its strings holds one (BY_NEWLINE in the lengths column: joined and split back by one call in
# C each), else concatenated, with their lengths ("3,0,12"). A one-message row is its whole text
# and identity; its lengths are never read.
BY_NEWLINE = "\n"
# A commit's rows go in multi-row INSERTs of 32, 16, 8, 4, 2 or 1 rows: a handful of statements
# a commit, each one step (SQLite gives the GIL back for each step, and every time the writer
# waits to get it back behind the listener and the consumers: most of a commit's time). Only these
# six sizes are prepared, and each statement keeps the texts last bound to it (SQLite copies
# them): a statement of more than one row holds at most STATEMENT_BYTES of them.
STATEMENT_ROWS = (32, 16, 8, 4, 2, 1)
STATEMENT_BYTES = 256 * 1024
_ROW = f"({', '.join('?' * len(COLUMNS))})"
_INSERTS = {n: f"INSERT INTO spool ({', '.join(COLUMNS)}) VALUES {', '.join([_ROW] * n)}" for n in STATEMENT_ROWS}
_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE spool (seq INTEGER PRIMARY KEY, received_at REAL NOT NULL, known INTEGER NOT NULL, "
    "request TEXT, accepted INTEGER, client TEXT, messages INTEGER NOT NULL, bytes INTEGER NOT NULL, "
    "idents TEXT NOT NULL, ident_lengths TEXT NOT NULL, texts TEXT NOT NULL, text_lengths TEXT NOT NULL)",
)
# Older files are upgraded in place when opened for writing: version 1 rows have no request,
# version 1 and 2 rows no client (their receipts are written without an owner); rows of versions
# 1 to 3 hold one message each, and become one-message rows of version 4 (whose lengths are
# never read: a one-message row is its whole text). Version 4 rows are version 5 rows that do not
# use BY_NEWLINE: only the version changes.
_UPGRADES: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE spool ADD COLUMN request TEXT", "ALTER TABLE spool ADD COLUMN accepted INTEGER"),
    2: ("ALTER TABLE spool ADD COLUMN client TEXT",),
    3: (
        _SCHEMA[1].replace("CREATE TABLE spool", "CREATE TABLE spool_v4"),
        "INSERT INTO spool_v4 SELECT seq, received_at, known, request, accepted, client, 1, "
        f"length(payload) + length(ident) + coalesce(length(request), 0) + {ROW_OVERHEAD_BYTES} "
        f"+ {MESSAGE_OVERHEAD_BYTES}, ident, length(ident), payload, length(payload) FROM spool ORDER BY seq",
        "DROP TABLE spool",
        "ALTER TABLE spool_v4 RENAME TO spool",
    ),
    4: (),
}


@dataclass(frozen=True)
class Row:
    """One accepted request as the spool keeps it."""

    seq: int
    received_at: float
    known: bool
    request: str | None  # None in rows a version 1 spool kept
    accepted: int | None
    client: str | None  # with --auth-tokens, the request's client; None in rows of versions 1 to 2
    bytes: int
    idents: list[str]
    texts: list[str]


@dataclass(frozen=True)
class Status:
    messages: int  # messages, not rows: a row holds a request
    bytes: int
    first_seq: int
    last_seq: int
    oldest_received_at: float | None

    def format(self, path: Path, now: float | None = None) -> str:
        age = "-" if self.oldest_received_at is None else f"{(now or time.time()) - self.oldest_received_at:.1f} s"
        return f"spool    {path}\nmessages {self.messages}\nbytes    {self.bytes}\noldest   {age}"


def request_bytes(texts_length: int, idents_length: int, request: str, messages: int) -> int:
    """A request's share of the spool's capacity (its texts in UTF-8 are at least this long)."""
    return texts_length + idents_length + len(request) + ROW_OVERHEAD_BYTES + messages * MESSAGE_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class Packed:
    """A request's texts and identities as its row keeps them, and its share of the spool's bytes."""

    idents: str
    ident_lengths: str
    texts: str
    text_lengths: str
    bytes: int


def pack(texts: list[str], idents: list[str], request: str) -> Packed:
    """A request's strings for its row (see BY_NEWLINE). Made on the listener's thread, once a
    request."""
    count = len(texts)
    if count == 1:
        text, ident = texts[0], idents[0]
        return Packed(ident, str(len(ident)), text, str(len(text)), request_bytes(len(text), len(ident), request, 1))
    text, text_lengths, texts_length = _packed(texts)
    ident, ident_lengths, idents_length = _packed(idents)
    return Packed(ident, ident_lengths, text, text_lengths, request_bytes(texts_length, idents_length, request, count))


def _packed(items: list[str]) -> tuple[str, str, int]:
    """Several strings as one, how to split them, and their length together."""
    blob = "\n".join(items)
    if blob.count("\n") == len(items) - 1:
        return blob, BY_NEWLINE, len(blob) - len(items) + 1
    blob, lengths = _joined(items)
    return blob, lengths, len(blob)


def unpack(blob: str, lengths: str, count: int) -> list[str]:
    """A row's texts or identities, back."""
    if count == 1:
        return [blob]
    if lengths == BY_NEWLINE:
        items = blob.split("\n")
        if len(items) != count:
            raise SpoolError(f"a spool row holds {len(items)} lines for {count} messages")
        return items
    return _split(blob, lengths, count)


def _joined(items: Sequence[str]) -> tuple[str, str]:
    """Strings as one, for any text: their concatenation and their lengths (a join and a split cost
    far less than a JSON array's escaping: measured in docs/performance/benchmark.md)."""
    return "".join(items), ",".join([str(len(item)) for item in items])


def _split(blob: str, lengths: str, count: int) -> list[str]:
    """The strings `_joined` made, back."""
    # Loops in C (map, slice): the feeder splits every message a spooled backlog holds, twice.
    bounds = list(itertools.accumulate(map(int, lengths.split(",")), initial=0))
    if len(bounds) != count + 1 or bounds[-1] != len(blob):
        raise SpoolError(f"a spool row's lengths do not match its contents ({len(bounds) - 1} of {count})")
    return list(map(blob.__getitem__, map(slice, bounds, bounds[1:])))


def claim(path: Path) -> IO[bytes]:
    """An exclusive lock on `<path>.lock`, held while the returned file stays open: a spool has one
    writer, and a second process on the same file would feed and delete the first one's rows."""
    lock_path = path.with_name(path.name + ".lock")
    while True:
        try:
            handle = lock_path.open("ab")
        except OSError as exc:
            raise SpoolError(f"spool {path}: cannot create {lock_path.name}: {exc.strerror}") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise SpoolError(f"spool {path}: in use by another ingest process (a spool has one writer)") from None
        if _still_there(handle, lock_path):
            return handle
        # Its holder removed it between our open and our lock (an adopter, done with the file or
        # clearing a lock left without one): a lock on a removed file would hold nothing.
        handle.close()


def _still_there(handle: IO[bytes], lock_path: Path) -> bool:
    try:
        return os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def open_spool(path: Path, sync: str = "full", *, create: bool = True, writable: bool = True) -> sqlite3.Connection:
    """A checked connection to the spool at `path`, created if missing (and `create`), upgraded to
    the current version if older (and `writable`).

    Not `writable`: opened read-only, for looking without changing anything."""
    if sync not in SPOOL_SYNC_MODES:
        raise SpoolError(f"spool sync must be one of {', '.join(SPOOL_SYNC_MODES)}, got {sync!r}")
    fresh = not path.exists() or path.stat().st_size == 0
    if fresh and not create:
        raise SpoolError(f"spool {path}: no such file")
    if not fresh:
        _check_header(path)
    try:
        target = _read_only(path) if not writable else str(path)
        conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False, uri=not writable)
    except sqlite3.Error as exc:
        raise SpoolError(f"spool {path}: cannot open: {exc}") from None
    try:
        if fresh:
            _create(conn)
        elif (version := _check_contents(conn, path)) < VERSION and writable:
            _upgrade(conn, version)
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        if writable:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={sync.upper()}")
            conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
    except sqlite3.Error as exc:
        conn.close()
        raise SpoolError(f"spool {path}: {exc}") from None
    except SpoolError:
        conn.close()
        raise
    return conn


def _read_only(path: Path) -> str:
    """The URI that reads a spool without writing: `mode=ro`. Where the directory cannot be written
    (a read-only mount), SQLite cannot make the WAL index (-shm) it needs to read, and would call a
    healthy file unopenable: `immutable=1` reads the main file alone (rows still only in a -wal a
    killed process left are then not seen; the process that adopts or reopens the file sees them)."""
    uri = f"file:{quote(str(path))}?mode=ro"
    return uri if os.access(path.parent, os.W_OK) else uri + "&immutable=1"


def _check_header(path: Path) -> None:
    try:
        with path.open("rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise SpoolError(f"spool {path}: cannot read: {exc.strerror}") from None
    if head != SQLITE_MAGIC:
        raise SpoolError(f"spool {path}: not a spool file (not SQLite; is it the right path?)")


def _check_contents(conn: sqlite3.Connection, path: Path) -> int:
    """Read-only checks: integrity, then the format and version the meta table names (returned)."""
    try:
        verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise SpoolError(f"spool {path}: damaged: {exc}") from None
    if verdict != "ok":
        raise SpoolError(f"spool {path}: damaged: {verdict}")
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not {"meta", "spool"} <= tables:
        raise SpoolError(f"spool {path}: a SQLite file, but not an ingest spool (tables: {', '.join(sorted(tables))})")
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("format") != FORMAT:
        raise SpoolError(f"spool {path}: not an ingest spool (format {meta.get('format')!r})")
    version = meta.get("version")
    if version not in [str(v) for v in range(1, VERSION + 1)]:
        raise SpoolError(
            f"spool {path}: format version {version}, this ingest reads versions 1 to {VERSION}; "
            "drain it with the ingest that wrote it"
        )
    return int(version)


def _upgrade(conn: sqlite3.Connection, version: int) -> None:
    with conn:
        conn.execute("BEGIN")
        for step in range(version, VERSION):
            for statement in _UPGRADES[step]:
                conn.execute(statement)
        conn.execute(f"UPDATE meta SET value = '{VERSION}' WHERE key = 'version'")


def _create(conn: sqlite3.Connection) -> None:
    # Incremental: the pages an emptied spool frees can be given back (SpoolWriter.shrink).
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    with conn:
        conn.execute("BEGIN")
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [("format", FORMAT), ("version", str(VERSION))])


def status(conn: sqlite3.Connection) -> Status:
    """What the spool holds; also of a file of an older version opened read-only (not upgraded)."""
    if "messages" in {name for _, name, *_ in conn.execute("PRAGMA table_info(spool)")}:
        counts = "coalesce(sum(messages), 0), coalesce(sum(bytes), 0)"
    else:  # versions 1 to 3: a row a message, its bytes as the upgrade counts them
        counts = (f"count(*), coalesce(sum(length(payload) + length(ident) + {ROW_OVERHEAD_BYTES} "
                  f"+ {MESSAGE_OVERHEAD_BYTES}), 0)")
    messages, size, first, last, oldest = conn.execute(
        f"SELECT {counts}, coalesce(min(seq), 0), coalesce(max(seq), 0), min(received_at) FROM spool"
    ).fetchone()
    return Status(messages, size, first, last, oldest)


def insert(conn: sqlite3.Connection, rows: Sequence[tuple[object, ...]]) -> None:
    """Rows in the order of COLUMNS (the writer builds them), in as few statements as STATEMENT_ROWS
    and STATEMENT_BYTES allow. (A statement of any number of rows, tried before, kept a statement
    of each size in the connection's cache with its texts: peak RSS 7 MiB up.)"""
    for chunk in _statements(rows):
        conn.execute(_INSERTS[len(chunk)], list(itertools.chain.from_iterable(chunk)))


def _statements(rows: Sequence[tuple[object, ...]]) -> Iterator[Sequence[tuple[object, ...]]]:
    """Runs of rows of at most STATEMENT_BYTES (a larger row alone), each cut in STATEMENT_ROWS sizes."""
    first, size = 0, 0
    for end, row in enumerate(rows):
        row_bytes = cast(int, row[_BYTES])
        if end > first and (end - first == STATEMENT_ROWS[0] or size + row_bytes > STATEMENT_BYTES):
            yield from _sized(rows[first:end])
            first, size = end, 0
        size += row_bytes
    yield from _sized(rows[first:])


def _sized(run: Sequence[tuple[object, ...]]) -> Iterator[Sequence[tuple[object, ...]]]:
    """13 rows: 8, 4 and 1."""
    start = 0
    for count in STATEMENT_ROWS:
        while len(run) - start >= count:
            yield run[start:start + count]
            start += count


def delete(conn: sqlite3.Connection, seqs: Sequence[int]) -> None:
    """By runs of consecutive seqs, a statement each (rows are mostly stored in order: few runs)."""
    conn.executemany("DELETE FROM spool WHERE seq BETWEEN ? AND ?", _runs(sorted(seqs)))


def _runs(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """[1, 2, 3, 7, 8] → [(1, 3), (7, 8)]."""
    runs: list[tuple[int, int]] = []
    for seq in seqs:
        if runs and runs[-1][1] == seq - 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


def read_after(conn: sqlite3.Connection, after_seq: int, up_to_seq: int, max_messages: int) -> list[Row]:
    """Rows after `after_seq`, in order, until they hold `max_messages` (at least one row)."""
    cursor = conn.execute(
        "SELECT seq, received_at, known, request, accepted, client, messages, bytes, idents, ident_lengths, texts, "
        "text_lengths FROM spool WHERE seq > ? AND seq <= ? ORDER BY seq",
        (after_seq, up_to_seq),
    )
    found: list[Row] = []
    count = 0
    try:
        for seq, received_at, known, request, accepted, client, n, size, idents, ident_lengths, texts, lengths \
                in cursor:
            found.append(Row(seq, received_at, bool(known), request, accepted, client, size,
                             unpack(idents, ident_lengths, n), unpack(texts, lengths, n)))
            count += n
            if count >= max_messages:
                break
    finally:
        cursor.close()
    return found
