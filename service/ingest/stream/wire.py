"""One JetStream message = one or more whole HTTP requests: how a listener writes them and a writer
reads them back.

A listener publishes the requests accepted while its previous publish was on its way together,
as one JetStream message (intake.py): the stream's servers and the writers then pay for one
stored, replicated, fsynced, delivered and acked message, not one per request. A request is
never split: it is in one JetStream message, whole, or in none.

Headers: `Nats-Msg-Id`, unique per published message (the listener's prefix and counter), so
the listener's own publish retries are deduplicated by the stream; and `Ingest-Wire: 2`, this
format. Not the request id, which a client may reuse for another request, and not the
Idempotency-Key: a client's retry must reach a writer, so that its receipt gets its rows; the
database's unique index dedupes it.

Payload: a first line, a JSON array with one object per request, then the requests' lines, in
order. A request's lines are its message texts, one a line (NDJSON lines and re-encoded array
items hold no raw newline), or, should a text hold one, a single line: the JSON array of its
texts (`"a": 1`). A request's object says what a writer needs to store each message once and
count it into the right receipt:

- `r` the request id, `n` its message count, `t` the listener's receive time (epoch seconds),
  `c` the client (when tokens name one), `f` 1 for a fresh request, `p` the subject a writer
  reports an ?ack=commit request's commit on;
- `i` the identities: `g:<prefix>:<first counter>` (consecutive generated identities),
  `k:<key>` (an Idempotency-Key: `k:<key>:<index>`), or the JSON array of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ingest import identities
from ingest.messages import Message

MSG_ID = "Nats-Msg-Id"
WIRE = "Ingest-Wire"
VERSION = "2"


class Malformed(ValueError):
    """A stream message no listener of ours wrote: a writer terminates it, never retries it."""


@dataclass(frozen=True, slots=True)
class Part:
    """One request, encoded: its object of the first line, and its lines."""

    descriptor: bytes
    body: bytes
    count: int

    @property
    def size(self) -> int:
        return len(self.descriptor) + len(self.body) + 2


def encode_request(batch: Sequence[Message], reply: str | None = None) -> Part:
    first = batch[0]
    receipt = first.receipt
    assert receipt is not None, "a request published to the stream has its receipt"
    texts = [m.text for m in batch]
    descriptor: dict[str, Any] = {"r": receipt.id, "n": len(batch), "t": first.received_at,
                                  "i": _idents([m.ident or "" for m in batch])}
    if receipt.client is not None:
        descriptor["c"] = receipt.client
    if receipt.fresh:
        descriptor["f"] = 1
    if reply is not None:
        descriptor["p"] = reply
    body = "\n".join(texts)
    if body.count("\n") != len(texts) - 1:
        descriptor["a"] = 1
        data = orjson.dumps(texts)
    else:
        data = body.encode()
    return Part(orjson.dumps(descriptor), data, len(batch))


def encode(parts: Sequence[Part], msg_id: str) -> tuple[bytes, dict[str, str]]:
    """One JetStream message of the requests `parts`, in order."""
    head = b"[" + b",".join(p.descriptor for p in parts) + b"]"
    return b"\n".join([head, *(p.body for p in parts)]), {MSG_ID: msg_id, WIRE: VERSION}


def _idents(idents: list[str]) -> str | list[str]:
    return identities.compact(idents[0], idents[-1], len(idents)) or idents


@dataclass(frozen=True, slots=True)
class Request:
    """A request as a writer reads it from the stream."""

    request_id: str
    received_at: float
    client: str | None
    fresh: bool
    reply: str | None
    texts: list[str]
    idents: list[str]
    generated: bool  # identities made by the listener: no stored row can have one before its first delivery


def decode(data: bytes, headers: dict[str, str] | None) -> list[Request]:
    """The requests of a stream message of either format: a writer must read what a listener of
    the version before wrote (a rolling upgrade leaves such messages in the stream, acknowledged)."""
    headers = headers or {}
    try:
        if headers.get(WIRE) == VERSION:
            return _decode(data)
        if WIRE not in headers and V1_REQUEST in headers:
            return [_decode_v1(data, headers)]
        raise ValueError(f"{WIRE} header {headers.get(WIRE)!r}, expected {VERSION!r}")
    except (KeyError, ValueError, TypeError, IndexError, orjson.JSONDecodeError) as exc:
        raise Malformed(f"not requests of an ingest listener: {exc!r}") from None


# Format 1: one request a message, described by headers (read, no longer written).
V1_REQUEST, V1_COUNT, V1_RECEIVED = "Ingest-Request", "Ingest-Count", "Ingest-Received"
V1_CLIENT, V1_FRESH, V1_IDENT, V1_FORMAT, V1_REPLY = (
    "Ingest-Client", "Ingest-Fresh", "Ingest-Ident", "Ingest-Format", "Ingest-Reply")


def _decode_v1(data: bytes, headers: dict[str, str]) -> Request:
    """Its payload: an `Ingest-Ident: list` request's JSON array of identities on a first line,
    then its texts, one a line (one message: the text as sent), or their JSON array
    (`Ingest-Format: array`)."""
    count = int(headers[V1_COUNT])
    ident = headers[V1_IDENT]
    if ident == "list":
        line, _, data = data.partition(b"\n")
        idents = [str(i) for i in orjson.loads(line)]
    else:
        idents = _identities(ident, count)
    if headers.get(V1_FORMAT) == "array":
        texts = [str(t) for t in orjson.loads(data)]
    elif count == 1:
        texts = [data.decode()]
    else:
        texts = data.decode().split("\n")
    if len(texts) != count or len(idents) != count:
        raise ValueError(f"{len(texts)} texts and {len(idents)} identities for a count of {count}")
    return Request(
        request_id=headers[V1_REQUEST], received_at=float(headers[V1_RECEIVED]), client=headers.get(V1_CLIENT),
        fresh=headers.get(V1_FRESH) == "1", reply=headers.get(V1_REPLY), texts=texts, idents=idents,
        generated=ident.startswith(identities.GENERATED),
    )


def _decode(data: bytes) -> list[Request]:
    head, _, rest = data.partition(b"\n")
    descriptors = orjson.loads(head)
    if not isinstance(descriptors, list) or not descriptors:
        raise ValueError("the first line is not a list of requests")
    lines = rest.decode().split("\n")
    at = 0
    requests = []
    for d in descriptors:
        count = int(d["n"])
        if d.get("a"):
            texts = [str(t) for t in orjson.loads(lines[at])]
            at += 1
        else:
            texts = lines[at:at + count]
            at += count
        idents = _identities(d["i"], count)
        if len(texts) != count or len(idents) != count:
            raise ValueError(f"{len(texts)} texts and {len(idents)} identities for a count of {count}")
        requests.append(Request(
            request_id=str(d["r"]), received_at=float(d["t"]), client=d.get("c"), fresh=d.get("f") == 1,
            reply=d.get("p"), texts=texts, idents=idents,
            generated=isinstance(d["i"], str) and d["i"].startswith(identities.GENERATED),
        ))
    if at != len(lines):
        raise ValueError(f"{len(lines)} lines for requests of {at}")
    return requests


def _identities(ident: str | list[str], count: int) -> list[str]:
    if isinstance(ident, list):
        return [str(i) for i in ident]
    return identities.expand(ident, count)
