"""The spool file: accepted messages on local disk until the database has them.

A SQLite file in WAL mode (a real embedded engine, no home-made log format). One table holds the
messages in acceptance order (`seq`); a `meta` table names the format and its version, so a
foreign or newer file is refused instead of being reset. Only the spool writer thread writes;
the feeder reads through a connection of its own.

Opening checks the file before writing anything to it: a damaged, foreign or unknown-version file
is a SpoolError naming the file and what is wrong, and the file is left as it was.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import quote

from ingest.errors import SpoolError
from ingest.vocabulary import SPOOL_SYNC_MODES

FORMAT = "ingest-spool"
VERSION = 3  # 2: each row names its request and the request's size, for receipts; 3: its client
SQLITE_MAGIC = b"SQLite format 3\x00"
# What a row costs on disk beyond its text: seq, received_at, flags and page overhead, roughly.
ROW_OVERHEAD_BYTES = 32

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE spool (seq INTEGER PRIMARY KEY, ident TEXT NOT NULL, known INTEGER NOT NULL, "
    "received_at REAL NOT NULL, payload TEXT NOT NULL, request TEXT, accepted INTEGER, client TEXT)",
)
# Older files are upgraded in place when opened for writing: version 1 rows have no request,
# version 1 and 2 rows no client (their receipts are written without an owner).
_UPGRADES = {
    1: ("ALTER TABLE spool ADD COLUMN request TEXT", "ALTER TABLE spool ADD COLUMN accepted INTEGER"),
    2: ("ALTER TABLE spool ADD COLUMN client TEXT",),
}


@dataclass(frozen=True)
class Row:
    seq: int
    ident: str
    known: bool
    received_at: float
    payload: str
    request: str | None  # None in rows a version 1 spool kept
    accepted: int | None
    client: str | None  # with --auth-tokens, the request's client; None in rows of versions 1 and 2


@dataclass(frozen=True)
class Status:
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    oldest_received_at: float | None

    def format(self, path: Path, now: float | None = None) -> str:
        age = "-" if self.oldest_received_at is None else f"{(now or time.time()) - self.oldest_received_at:.1f} s"
        return f"spool    {path}\nmessages {self.messages}\nbytes    {self.bytes}\noldest   {age}"


def row_bytes(payload: str, ident: str, request: str) -> int:
    """A message's share of the spool's capacity (its text in UTF-8 is at least this long)."""
    return len(payload) + len(ident) + len(request) + ROW_OVERHEAD_BYTES


def claim(path: Path) -> IO[bytes]:
    """An exclusive lock on `<path>.lock`, held while the returned file stays open: a spool has one
    writer, and a second process on the same file would feed and delete the first one's rows."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        handle = lock_path.open("ab")
    except OSError as exc:
        raise SpoolError(f"spool {path}: cannot create {lock_path.name}: {exc.strerror}") from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SpoolError(f"spool {path}: in use by another ingest process (a spool has one writer)") from None
    return handle


def open_spool(path: Path, sync: str = "full", *, create: bool = True, writable: bool = True) -> sqlite3.Connection:
    """A checked connection to the spool at `path`, created if missing (and `create`).

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
        if writable:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={sync.upper()}")
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
    with conn:
        conn.execute("BEGIN")
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [("format", FORMAT), ("version", str(VERSION))])


def status(conn: sqlite3.Connection) -> Status:
    count, size, first, last, oldest = conn.execute(
        f"SELECT count(*), coalesce(sum(length(payload) + length(ident) + coalesce(length(request), 0) "
        f"+ {ROW_OVERHEAD_BYTES}), 0), "
        "coalesce(min(seq), 0), coalesce(max(seq), 0), min(received_at) FROM spool"
    ).fetchone()
    return Status(count, size, first, last, oldest)


def read_after(conn: sqlite3.Connection, after_seq: int, up_to_seq: int, limit: int) -> list[Row]:
    rows = conn.execute(
        "SELECT seq, ident, known, received_at, payload, request, accepted, client FROM spool "
        "WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
        (after_seq, up_to_seq, limit),
    ).fetchall()
    return [
        Row(seq, ident, bool(known), received_at, payload, request, accepted, client)
        for seq, ident, known, received_at, payload, request, accepted, client in rows
    ]
