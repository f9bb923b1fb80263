"""An idempotent load for the stream's fault tests: requests with an Idempotency-Key each, sent
again with the same key after a 503 or a broken connection, as `ingest push --idempotent` does,
until each has its 202. Every attempt is recorded with its time and status."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

from support.httpclient import request


@dataclass
class Attempt:
    at: float
    key: str
    status: int  # 0: no answer (connection refused or broken)


@dataclass
class IdempotentLoad:
    url: str
    requests: int
    per_request: int = 10
    deadline_s: float = 60.0
    attempts: list[Attempt] = field(default_factory=list)
    accepted: set[str] = field(default_factory=set)
    sent: int = 0  # requests handed out so far, a progress mark for the test

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="idempotent-load", daemon=True)
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Send no new request; the one under way is still retried until its 202."""
        self._stopping.set()

    def start(self) -> IdempotentLoad:
        self._thread.start()
        return self

    def join(self, timeout_s: float = 90.0) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the load did not finish"

    @property
    def messages(self) -> int:
        return len(self.accepted) * self.per_request

    def statuses(self, start: float = 0.0, end: float = float("inf")) -> list[int]:
        return [a.status for a in self.attempts if start <= a.at < end]

    def _run(self) -> None:
        stop = time.monotonic() + self.deadline_s
        for n in range(self.requests):
            if self._stopping.is_set():
                return
            key = f"load-{n}"
            body = b"".join(json.dumps({"n": n, "i": i}).encode() + b"\n" for i in range(self.per_request))
            self.sent = n + 1
            while time.monotonic() < stop:
                try:
                    reply = request(f"{self.url}/messages", "POST", body, {
                        "Content-Type": "application/x-ndjson", "Idempotency-Key": key}, timeout_s=10)
                    status = reply.status
                except OSError:
                    status = 0
                self.attempts.append(Attempt(time.monotonic(), key, status))
                if status == 202:
                    self.accepted.add(key)
                    break
                time.sleep(0.05)  # the client's pause before its retry
