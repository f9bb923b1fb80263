"""Message identity: every accepted message gets one, and the database stores each once.

Three sources, checked on the listener before anything is enqueued:
- generated: `g:<process>:<counter>`, unique without coordination (a random per-process prefix,
  a fixed-width hex counter, so new identities append to the index instead of landing at random);
- a client's `Idempotency-Key` header: `k:<key>:<index in the request>`, so the same request
  sent again (after a timeout, a 503, to another replica, after a restart) names the same messages;
- a field of each message (`--id-field`): `f:<value>`, as event APIs do with an event id.
"""

from __future__ import annotations

import json
import re
import uuid

from ingest.errors import Invalid
from ingest.identities import GENERATED, generated_run, keyed_run

IDEMPOTENCY_HEADER = "Idempotency-Key"
_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_DECODER = json.JSONDecoder()


class Generator:
    """Identities for messages that bring none. Called on the listener thread only."""

    def __init__(self) -> None:
        self._prefix = f"{GENERATED}{uuid.uuid4().hex[:12]}:"
        self._next = 0

    def take(self, count: int) -> list[str]:
        start, self._next = self._next, self._next + count
        return generated_run(self._prefix, start, count)


def checked_key(header: str) -> str:
    """The Idempotency-Key as sent, or Invalid: 1 to 255 visible ASCII characters."""
    if not _KEY.fullmatch(header):
        raise Invalid(
            f"{IDEMPOTENCY_HEADER} must be 1 to 255 visible ASCII characters (no spaces), "
            f"got {len(header)} character(s)"
        )
    return header


def from_key(key: str, count: int) -> list[str]:
    return keyed_run(key, count)


def from_field(texts: list[str], field: str) -> list[str]:
    """Each message's `field` (a non-empty string or an integer) as its identity, or Invalid."""
    idents = []
    for index, text in enumerate(texts):
        value = _DECODER.decode(text).get(field)
        if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
            raise Invalid(
                f"message at index {index} has no usable {field!r}: the identity field must be "
                "a non-empty string or an integer",
                {"index": index, "field": field},
            )
        idents.append(f"f:{value}")
    return idents
