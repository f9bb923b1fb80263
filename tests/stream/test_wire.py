"""One stream message = one or more whole requests: what a listener writes, a writer reads back the same."""

from __future__ import annotations

import pytest

from ingest.http.identity import Generator, from_field, from_key
from ingest.messages import Message, Receipt
from ingest.stream import wire


def batch(texts: list[str], idents: list[str], *, request: str = "req-1", client: str | None = None) -> list[Message]:
    receipt = Receipt(request, len(texts), 1764243000.25, fresh=True, client=client)
    return [Message(t, receipt.received_at, ident=i, receipt=receipt) for t, i in zip(texts, idents, strict=True)]


@pytest.mark.parametrize("kind", ["generated", "key", "field"])
def test_identities_and_texts_come_back_as_sent(kind: str) -> None:
    texts = [f'{{"id": {n}, "v": "x"}}' for n in range(5)]
    idents = {"generated": Generator().take(5), "key": from_key("abc:1", 5), "field": from_field(texts, "id")}[kind]
    data, headers = wire.encode([wire.encode_request(batch(texts, idents, client="alice"), "_INGEST.reply.p")],
                                "prefix:7")
    assert headers == {wire.MSG_ID: "prefix:7", wire.WIRE: wire.VERSION}
    [request] = wire.decode(data, headers)
    assert (request.texts, request.idents) == (texts, idents)
    assert (request.request_id, request.received_at, request.client, request.fresh, request.reply) == (
        "req-1", 1764243000.25, "alice", True, "_INGEST.reply.p")
    assert request.generated == (kind == "generated")


def test_requests_published_together_come_back_apart_in_order() -> None:
    identities = Generator()
    sent = [
        (['{"a": 1}'], "r1"),
        (['{"a":\n 2}'], "r2"),  # a raw newline in a 1-message request
        ([f'{{"b": {n}}}' for n in range(3)], "r3"),
        (['{"c":\n1}', '{"c": 2}'], "r4"),  # a raw newline among several: a JSON array line
        (['{"d": 1}', '{"d": 2}'], "r5"),
    ]
    idents = [identities.take(len(texts)) for texts, _ in sent]
    parts = [wire.encode_request(batch(texts, ids, request=rid))
             for (texts, rid), ids in zip(sent, idents, strict=True)]
    data, headers = wire.encode(parts, "p:2")
    got = wire.decode(data, headers)
    assert [(r.request_id, r.texts, r.idents) for r in got] == [
        (rid, texts, ids) for (texts, rid), ids in zip(sent, idents, strict=True)]
    assert all(r.reply is None and r.client is None and r.generated for r in got)


@pytest.mark.parametrize(("data", "headers"), [
    (b'{"a": 1}\n{"b": 2}', None),
    (b'{"a": 1}\n{"b": 2}', {"Ingest-Count": "2"}),  # the format of one request a message, before groups
    (b'[{"r": "x", "n": 3, "t": 1.0, "i": "k:x"}]\n{"a": 1}\n{"b": 2}', {wire.WIRE: wire.VERSION}),
    (b'[{"r": "x", "n": 1, "t": 1.0, "i": "k:x"}]\n{"a": 1}\n{"b": 2}', {wire.WIRE: wire.VERSION}),
    (b'[{"r": "x", "n": 1, "t": 1.0, "i": "z:x"}]\n{"a": 1}', {wire.WIRE: wire.VERSION}),
    (b'[]\n{"a": 1}', {wire.WIRE: wire.VERSION}),
    (b'{"a": 1}', {wire.WIRE: wire.VERSION}),
])
def test_anything_else_is_malformed(data: bytes, headers: dict[str, str] | None) -> None:
    with pytest.raises(wire.Malformed):
        wire.decode(data, headers)


@pytest.mark.parametrize(("data", "headers", "texts", "idents"), [
    (b'{"a":1}\n{"a":2}', {"Ingest-Ident": "g:p1:00000000000a", "Ingest-Count": "2"},
     ['{"a":1}', '{"a":2}'], ["g:p1:00000000000a", "g:p1:00000000000b"]),
    (b'{"a":"x\\ny"}', {"Ingest-Ident": "k:key", "Ingest-Count": "1"}, ['{"a":"x\\ny"}'], ["k:key:0"]),
    (b'["f:1","f:2"]\n["{\\"a\\":\\"x\\ny\\"}","{}"]',
     {"Ingest-Ident": "list", "Ingest-Count": "2", "Ingest-Format": "array"},
     ['{"a":"x\ny"}', "{}"], ["f:1", "f:2"]),
])
def test_a_message_of_format_1_is_still_read(data: bytes, headers: dict[str, str], texts: list[str],
                                             idents: list[str]) -> None:
    """Written by a listener of the version before (one request a message, described by headers):
    a rolling upgrade leaves them in the stream, acknowledged, for writers of this version."""
    headers = {"Nats-Msg-Id": "p1:7", "Ingest-Request": "req-9", "Ingest-Received": "1700000000.5",
               "Ingest-Client": "acme", "Ingest-Fresh": "1", "Ingest-Reply": "_INBOX.r", **headers}
    (request,) = wire.decode(data, headers)
    assert (request.request_id, request.received_at, request.client, request.fresh, request.reply) == (
        "req-9", 1700000000.5, "acme", True, "_INBOX.r")
    assert request.texts == texts and request.idents == idents
    assert request.generated == idents[0].startswith("g:")
