"""The spool adopter thread: stores what processes that are gone left in a spool directory.

With `--spool DIR` (directory.py), at start and then every ADOPT_INTERVAL_S, this thread lists
the directory's spool files other than its own and tries each one's lock without waiting. A
free lock means the file's process is gone (exited, killed, scaled away): the file is an orphan.
Holding its lock, the thread opens it once (file.open_spool: checked, upgraded to the current
format, counted), and hands it to this process's spool writer, which appends its rows to its own file in one
transaction (absorb.py); then the orphan's files are deleted, still under its lock, and the lock
is let go. The feeder stores the adopted messages after the backlog already here.

A crash between the writer's commit and the delete leaves the orphan in place with its rows
also in the adopter's file: whoever adopts both later stores each message once (identities, the
database's unique index; receipts count only rows actually inserted).

`orphaned` (ingest_spool_orphaned_messages): messages in orphans the latest scan found, less
those adopted since; a file that cannot be adopted (damaged, or of a newer format) keeps
counting as 1 (its messages are unknown, and the alert must still see it), is logged once, and is
not opened again while its size and modification time stay the same (a quick_check reads the
whole file).

A lock file with no spool file beside it is what a process killed between taking its lock and
creating its file leaves: whoever can take that lock removes it.

Error policy: a file that cannot be adopted, or a failed listing, is logged and tried again at
the next scan; any other exception ends the thread, which the service notices.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import IO

from ingest.errors import ShuttingDown, SpoolError, SpoolUnavailable
from ingest.spool import directory
from ingest.spool import file as spool
from ingest.spool.writer import SpoolWriter

log = logging.getLogger(__name__)

ADOPT_INTERVAL_S = 5.0
WAIT_S = 0.5
UNCOUNTED = 1  # what an orphan that cannot be read counts for: something is there


class SpoolAdopter(threading.Thread):
    """Non-daemon: it may hold an orphan's lock with its rows half handed over; stop() and join."""

    def __init__(self, writer: SpoolWriter, directory_path: Path, *, interval_s: float = ADOPT_INTERVAL_S) -> None:
        super().__init__(name="spool-adopter", daemon=False)
        self._writer = writer
        self._directory = directory_path
        self._interval_s = interval_s
        self._halt = threading.Event()
        self._reported: set[Path] = set()  # files that could not be adopted, said once
        self._refused: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) when it could not be opened
        self.opened = 0  # orphans opened (checked), since start
        self.orphaned = 0
        self.adopted = 0  # messages, since start

    def __repr__(self) -> str:
        return f"SpoolAdopter({self._directory}, orphaned={self.orphaned}, adopted={self.adopted})"

    def stop(self) -> None:
        """Adopt nothing more (a stopping process would only leave it behind again)."""
        self._halt.set()

    def run(self) -> None:
        while True:
            try:
                self.scan()
            except OSError as exc:
                log.error("spool %s: cannot look for orphaned spools: %s", self._directory, exc)
            if self._halt.wait(self._interval_s):
                return

    def scan(self) -> None:
        """One round: find the orphans, open and count them, adopt them one by one; then the lock
        files left without a spool file."""
        orphans = self._claim_orphans()
        try:
            found = {path: self._open(path) for path, _lock in orphans}
            self.orphaned = sum(UNCOUNTED if status is None else status.messages for status in found.values())
            for path, _lock in orphans:
                status = found[path]
                if status is None or self._halt.is_set():
                    continue
                if self._adopt(path, status):
                    self.orphaned -= status.messages
                    directory.remove(path)  # under its lock (let go below), the lock file last
        finally:
            for _path, lock in orphans:
                lock.close()
        self._remove_stale_locks()

    def _remove_stale_locks(self) -> None:
        for path in directory.without_file(self._directory):
            lock = directory.try_claim(path)
            if lock is None:
                continue  # its process lives and is about to create its file
            try:
                if directory.gone(path):
                    directory.remove(path)  # the lock file, still held (see file.claim)
            finally:
                lock.close()

    def _claim_orphans(self) -> list[tuple[Path, IO[bytes]]]:
        orphans = []
        for path in directory.spool_files(self._directory):
            if path == self._writer.path:
                continue
            lock = directory.try_claim(path)
            if lock is None:
                continue  # its owner lives, or another process is adopting it
            if directory.gone(path):
                directory.remove(path)  # adopted by another since we listed it: our new lock file goes
                lock.close()
                continue
            orphans.append((path, lock))
        return orphans

    def _open(self, path: Path) -> spool.Status | None:
        """Open it once, under its lock: checked, upgraded, counted. None when it cannot be adopted
        (said once a file), also without opening it again while it has not changed since."""
        try:
            stat = path.stat()
        except OSError:
            return None  # adopted and removed by another since we listed it (or unreadable): next scan
        seen = (stat.st_size, stat.st_mtime_ns)
        if self._refused.get(path) == seen:
            return None
        self.opened += 1
        try:
            conn = spool.open_spool(path, self._writer.sync, create=False)
            try:
                found = spool.status(conn)
            finally:
                conn.close()
        except (SpoolError, sqlite3.Error) as exc:
            self._refused[path] = seen
            if path not in self._reported:
                self._reported.add(path)
                log.error("%s; it cannot be adopted: move it aside, or drain it with the ingest that wrote it", exc)
            return None
        self._refused.pop(path, None)
        return found

    def _adopt(self, path: Path, found: spool.Status) -> bool:
        """Hand the orphan to the writer and wait for its commit; False if it stays where it is."""
        try:
            if found.messages:
                self._wait(self._writer.absorb(path, found))
        except ShuttingDown:
            return False
        except (SpoolError, SpoolUnavailable, sqlite3.Error) as exc:
            # Said once a file at error level: the next scans try again, and may fail alike.
            level = logging.DEBUG if path in self._reported else logging.ERROR
            self._reported.add(path)
            log.log(level, "spool %s: adoption failed, trying again every %.0f s: %s", path, self._interval_s, exc)
            return False
        self.adopted += found.messages
        if found.messages:
            log.info("spool %s: adopted %d acknowledged message(s) from %s (its process is gone); "
                     "they are stored after the %d waiting here before them",
                     self._writer.path, found.messages, path.name, self._writer.messages - found.messages)
        return True

    def _wait(self, absorbed: Future[None]) -> None:
        """Its commit, or the writer's end: a writer that died never settles what it was handed."""
        while True:
            try:
                return absorbed.result(WAIT_S)
            except TimeoutError:
                if not self._writer.is_alive():
                    raise SpoolUnavailable("the spool writer has stopped") from None
