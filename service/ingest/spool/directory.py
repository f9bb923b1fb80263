"""A spool directory: one spool file per process, and the files whose process is gone.

With `--spool DIR` every process (each `--workers` worker, each replica) writes its own file,
`DIR/spool-<owner>.db`, named by an owner id no other process ever uses (host, pid and a random
part). The file's lock (file.claim, an exclusive flock on `<file>.lock`) is taken before the file
is created and held while the process lives, so the lock is the one fact of ownership:
- held: a live process writes the file; nobody else touches it;
- free: its process exited, was killed or was scaled away. The file is an orphan, and whoever
  takes its lock first may adopt it (adopter.py). A process that loses that race gets no lock
  and skips the file, so two processes never adopt one file.

flock works across the containers of one host (one kernel), not across hosts: the directory
must not be on a network filesystem.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ingest.errors import SpoolError
from ingest.spool import file as spool

PREFIX = "spool-"
SUFFIX = ".db"
# What SQLite keeps beside a database in WAL mode, and our lock: all go with the file.
COMPANIONS = ("-wal", "-shm", ".lock")


def owner_id() -> str:
    """Unique without coordination: the host (a container's id), the pid, and 6 random bytes
    (pids repeat across containers and restarts)."""
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(6)}"


def own_file(directory: Path) -> Path:
    return directory / f"{PREFIX}{owner_id()}{SUFFIX}"


def spool_files(directory: Path) -> list[Path]:
    """Every spool file in the directory, oldest name order (stable across calls)."""
    return sorted(p for p in directory.glob(f"{PREFIX}*{SUFFIX}") if p.is_file())


def without_file(directory: Path) -> list[Path]:
    """The spool files whose lock file is there but not the file: a process that took its lock
    and died before creating its file (or one about to create it)."""
    return sorted(p for lock in directory.glob(f"{PREFIX}*{SUFFIX}.lock")
                  if not (p := lock.with_name(lock.name.removesuffix(".lock"))).exists())


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def try_claim(path: Path) -> IO[bytes] | None:
    """The file's lock if nobody holds it (its owner is gone), else None: its owner lives, or
    another process is adopting it right now."""
    try:
        return spool.claim(path)
    except SpoolError:
        return None


def owned(path: Path) -> bool:
    """Whether a live process holds the file's lock, asked without creating or keeping anything
    (a shared lock, given back at once; the lock file opened read-only, so it works on a
    read-only directory). No lock file: nobody has held it since it was cleaned up."""
    try:
        handle = lock_path(path).open("rb")
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return False


def remove(path: Path) -> None:
    """Delete a spool file and its companions. Only while holding its lock: the lock file goes
    last, so nobody can take a fresh lock on a file still there (and a lock file a late adopter
    creates for a file already gone is removed by that adopter, see `gone`)."""
    for name in (path, *(path.with_name(path.name + c) for c in COMPANIONS)):
        with contextlib.suppress(FileNotFoundError):
            name.unlink()


def gone(path: Path) -> bool:
    """No data to adopt: the file was adopted and removed between our listing and our lock, or its
    process died after taking its lock and before writing the file's first page."""
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return True


EMPTY = spool.Status(messages=0, bytes=0, first_seq=0, last_seq=0, oldest_received_at=None)


@dataclass(frozen=True)
class Entry:
    """One file of a spool directory, as `ingest spool status` shows it."""

    path: Path
    owned: bool
    status: spool.Status | None  # None: unreadable (`error` says why)
    error: str | None = None

    def format(self) -> str:
        owner = "owned by a live process" if self.owned else "orphaned (no process holds its lock)"
        if self.status is None:
            return f"{self.path.name}  {owner}  unreadable: {self.error}"
        return f"{self.path.name}  {owner}  messages {self.status.messages}  bytes {self.status.bytes}"


def entries(directory: Path) -> Iterator[Entry]:
    """What each file holds and whether a live process owns it, opened read-only. A file that
    goes between the listing and its reading (adopted and removed, or its owner stopped
    cleanly) is left out: it holds nothing any more."""
    for path in spool_files(directory):
        entry = _entry(path)
        if entry is not None:
            yield entry


def _entry(path: Path) -> Entry | None:
    is_owned = owned(path)
    try:
        conn = spool.open_spool(path, create=False, writable=False)
    except SpoolError as exc:
        if not path.exists():
            return None
        if gone(path):  # created, not yet written: its process is starting
            return Entry(path, is_owned, EMPTY)
        return Entry(path, is_owned, None, str(exc).removeprefix(f"spool {path}: "))
    try:
        return Entry(path, is_owned, spool.status(conn))
    finally:
        conn.close()
