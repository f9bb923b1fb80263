"""A real `ingest serve` subprocess: started on port 0, its URL read from its log."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_READY = re.compile(r"ingest ready on (http://\S+)")


class ServeProcess:
    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, *, wait_ready: bool = True, command: str = "serve",
    ) -> None:
        """`command`: serve, or write (a stream buffer's writer, also ready once it logs so)."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ingest", command, "--port", "0", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.log: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="serve-log", daemon=True)
        self._reader.start()
        self.url = self.wait_ready() if wait_ready else ""

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self, timeout_s: float = 30.0) -> str:
        while True:
            try:
                line = self._lines.get(timeout=timeout_s)
            except queue.Empty:
                raise AssertionError(f"ingest serve not ready in {timeout_s}s:\n{''.join(self.log)}") from None
            if line is None:
                raise AssertionError(f"ingest serve exited before ready:\n{''.join(self.log)}")
            if match := _READY.search(line):
                return match.group(1)

    def wait(self, timeout_s: float = 60.0) -> int:
        code = self.process.wait(timeout_s)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(10)
        assert self.process.stderr is not None
        self.process.stderr.close()


@contextmanager
def serving(
    args: list[str], env: dict[str, str] | None = None, *, wait_ready: bool = True
) -> Iterator[ServeProcess]:
    proc = ServeProcess(args, env, wait_ready=wait_ready)
    try:
        yield proc
    finally:
        proc.kill()
