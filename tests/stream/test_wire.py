"""One request = one stream message: what a listener writes, a writer reads back the same."""

from __future__ import annotations

import pytest

from ingest.http.identity import Generator, from_field, from_key
from ingest.messages import Message, Receipt
from ingest.stream import wire


def batch(texts: list[str], idents: list[str], *, client: str | None = None) -> list[Message]:
    receipt = Receipt("req-1", len(texts), 1764243000.25, fresh=True, client=client)
    return [Message(t, receipt.received_at, ident=i, receipt=receipt) for t, i in zip(texts, idents, strict=True)]


@pytest.mark.parametrize("kind", ["generated", "key", "field"])
def test_identities_and_texts_come_back_as_sent(kind: str) -> None:
    texts = [f'{{"id": {n}, "v": "x"}}' for n in range(5)]
    idents = {"generated": Generator().take(5), "key": from_key("abc:1", 5), "field": from_field(texts, "id")}[kind]
    data, headers = wire.encode(batch(texts, idents, client="alice"), "prefix:7", reply="_INGEST.reply.p")
    assert headers[wire.MSG_ID] == "prefix:7"
    assert headers[wire.IDENT] == {"generated": idents[0], "key": "k:abc:1", "field": "list"}[kind]
    request = wire.decode(data, headers)
    assert (request.texts, request.idents) == (texts, idents)
    assert (request.request_id, request.received_at, request.client, request.fresh, request.reply) == (
        "req-1", 1764243000.25, "alice", True, "_INGEST.reply.p")
    assert request.generated == (kind == "generated")


def test_a_text_with_a_raw_newline_travels_as_a_json_array() -> None:
    texts = ['{"a":\n1}', '{"b": 2}']
    data, headers = wire.encode(batch(texts, Generator().take(2)), "p:1")
    assert headers[wire.FORMAT] == "array"
    assert wire.decode(data, headers).texts == texts


def test_one_message_is_its_text_as_sent() -> None:
    texts = ['{"a":\n 1}']
    data, headers = wire.encode(batch(texts, Generator().take(1)), "p:1")
    assert data == texts[0].encode() and wire.FORMAT not in headers
    assert wire.decode(data, headers).texts == texts


@pytest.mark.parametrize("headers", [None, {"Ingest-Count": "2"}, {
    "Ingest-Count": "3", "Ingest-Ident": "k:x", "Ingest-Request": "r", "Ingest-Received": "1.0"}])
def test_anything_else_is_malformed(headers: dict[str, str] | None) -> None:
    with pytest.raises(wire.Malformed):
        wire.decode(b'{"a": 1}\n{"b": 2}', headers)
