"""The one polling helper: wait for a condition with a deadline and a clear failure message."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    pass


def wait_until(predicate: Callable[[], T], timeout_s: float = 10.0, what: str = "condition") -> T:
    """Return the predicate's first truthy value; fail the test if none comes by the deadline."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout_s}s waiting for {what}")
        # Not a synchronising sleep: the poll interval of a condition with a deadline.
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
