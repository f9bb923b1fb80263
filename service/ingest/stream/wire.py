"""One JetStream message = one whole HTTP request: how a listener writes it and a writer reads it.

Payload: the request's message texts joined by newlines (NDJSON lines and re-encoded array
items hold no raw newline; a request of one message is that message as sent), or, should a
text hold one, a JSON array of the texts (`Ingest-Format: array`). Headers carry what the writer
needs to store each message once and count it into the right receipt:

- `Nats-Msg-Id`: unique per accepted request (the listener's prefix and counter), so the
  listener's own publish retries are deduplicated by the stream. Not the request id, which a
  client may reuse for another request, and not the Idempotency-Key: a client's retry must
  reach a writer, so that its receipt gets its rows; the database's unique index dedupes it.
- `Ingest-Request`, `Ingest-Count`, `Ingest-Received`, `Ingest-Client`, `Ingest-Fresh`: the receipt.
- `Ingest-Ident`: `g:<prefix>:<first counter>` (consecutive generated identities), `k:<key>` (an
  Idempotency-Key: `k:<key>:<index>`), or `list` (the first payload line is a JSON array of them).
- `Ingest-Reply`: for ?ack=commit, the subject the writer reports the commit on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from ingest.messages import Message

MSG_ID = "Nats-Msg-Id"
REQUEST = "Ingest-Request"
COUNT = "Ingest-Count"
RECEIVED = "Ingest-Received"
CLIENT = "Ingest-Client"
FRESH = "Ingest-Fresh"
IDENT = "Ingest-Ident"
FORMAT = "Ingest-Format"
REPLY = "Ingest-Reply"
_GENERATED_WIDTH = 12  # identity.Generator's counter width, in hex digits


class Malformed(ValueError):
    """A stream message no listener of ours wrote: a writer terminates it, never retries it."""


def encode(batch: Sequence[Message], msg_id: str, reply: str | None = None) -> tuple[bytes, dict[str, str]]:
    first = batch[0]
    receipt = first.receipt
    assert receipt is not None, "a request published to the stream has its receipt"
    texts = [m.text for m in batch]
    idents = [m.ident or "" for m in batch]
    headers = {
        MSG_ID: msg_id, REQUEST: receipt.id, COUNT: str(len(batch)), RECEIVED: repr(first.received_at),
    }
    if receipt.client is not None:
        headers[CLIENT] = receipt.client
    if receipt.fresh:
        headers[FRESH] = "1"
    if reply is not None:
        headers[REPLY] = reply
    body = "\n".join(texts)
    if len(texts) > 1 and body.count("\n") != len(texts) - 1:
        headers[FORMAT] = "array"
        data = orjson.dumps(texts)
    else:
        data = body.encode()
    headers[IDENT], ident_line = _idents(idents)
    if ident_line is not None:
        data = ident_line + b"\n" + data
    return data, headers


def _idents(idents: list[str]) -> tuple[str, bytes | None]:
    first, count = idents[0], len(idents)
    if first.startswith("g:") and _generated(first, count, idents[-1]):
        return first, None
    if first.startswith("k:") and first.endswith(":0"):
        key = first[2:-2]
        if idents[-1] == f"k:{key}:{count - 1}":
            return f"k:{key}", None
    return "list", orjson.dumps(idents)


def _generated(first: str, count: int, last: str) -> bool:
    prefix, _, counter = first.rpartition(":")
    return last == f"{prefix}:{int(counter, 16) + count - 1:0{_GENERATED_WIDTH}x}"


@dataclass(frozen=True)
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


def decode(data: bytes, headers: dict[str, str] | None) -> Request:
    try:
        return _decode(data, headers or {})
    except (KeyError, ValueError, orjson.JSONDecodeError) as exc:
        raise Malformed(f"not a request of an ingest listener: {exc!r}") from None


def _decode(data: bytes, headers: dict[str, str]) -> Request:
    count = int(headers[COUNT])
    ident = headers[IDENT]
    if ident == "list":
        line, _, data = data.partition(b"\n")
        idents = [str(i) for i in orjson.loads(line)]
    elif ident.startswith("k:"):
        idents = [f"{ident}:{index}" for index in range(count)]
    elif ident.startswith("g:"):
        prefix, _, counter = ident.rpartition(":")
        start = int(counter, 16)
        idents = [f"{prefix}:{n:0{_GENERATED_WIDTH}x}" for n in range(start, start + count)]
    else:
        raise ValueError(f"identity header {ident!r}")
    if headers.get(FORMAT) == "array":
        texts = [str(t) for t in orjson.loads(data)]
    elif count == 1:
        texts = [data.decode()]
    else:
        texts = data.decode().split("\n")
    if len(texts) != count or len(idents) != count:
        raise ValueError(f"{len(texts)} texts and {len(idents)} identities for a count of {count}")
    return Request(
        request_id=headers[REQUEST], received_at=float(headers[RECEIVED]), client=headers.get(CLIENT),
        fresh=headers.get(FRESH) == "1", reply=headers.get(REPLY), texts=texts, idents=idents,
        generated=ident.startswith("g:"),
    )
