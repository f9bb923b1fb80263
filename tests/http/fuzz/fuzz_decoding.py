"""A coverage-guided fuzz target (atheris) for the request decoding: bytes off the wire, any
Content-Type and Content-Encoding, through decompress() and decode().

The only acceptable outcomes are a list of messages, each the JSON text of an object, or one of
ingest's own refusals (Rejected: 400, 413, 415). Anything else, a crash or a message that is not
an object, is a bug. It also checks the parser pair decoding.py uses: orjson must never accept a
text the standard library refuses (that would widen what ingest accepts). Run by
tests/test_fuzz.py for a bounded time; by hand:

    python tests/http/fuzz/fuzz_decoding.py -max_total_time=600 tests/http/fuzz/corpus
"""

from __future__ import annotations

import json
import sys

import atheris
import orjson

with atheris.instrument_imports():
    from ingest.errors import Rejected
    from ingest.http.decoding import _DECODER, decode, decompress

CONTENT_TYPES = [
    "application/json", "application/x-ndjson", "application/ndjson", "application/jsonl",
    "application/json; charset=utf-8", "application/json; charset=latin-1", "text/plain", "",
]
ENCODINGS = ["", "identity", "gzip", "deflate", "x-gzip", "br", " GZIP "]
LIMIT = 64 * 1024


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    content_type = CONTENT_TYPES[provider.ConsumeIntInRange(0, len(CONTENT_TYPES) - 1)]
    encoding = ENCODINGS[provider.ConsumeIntInRange(0, len(ENCODINGS) - 1)]
    body = provider.ConsumeBytes(provider.remaining_bytes())
    _orjson_is_no_wider(body)
    try:
        texts = decode(decompress(body, encoding, LIMIT), content_type)
    except Rejected:
        return
    assert texts, "decode() returned no messages without refusing"
    for text in texts:
        assert isinstance(json.loads(text), dict), f"not an object: {text[:80]!r}"


def _orjson_is_no_wider(body: bytes) -> None:
    try:
        text = body.decode()
        orjson.loads(text)
    except (UnicodeDecodeError, orjson.JSONDecodeError):
        return
    try:
        _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise AssertionError(f"orjson accepts what json refuses ({exc}): {text[:80]!r}") from None


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
