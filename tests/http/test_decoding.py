import gzip
import json
import zlib

import pytest

from ingest.errors import Invalid, TooLarge, Unsupported
from ingest.http.decoding import decode, decompress, media_type


def test_one_object_is_kept_as_sent() -> None:
    assert decode(b' {"a":\t1, "\xc3\xa9": "\\u00e9"}\n', "application/json") == ['{"a":\t1, "\u00e9": "\\u00e9"}']


def test_array_of_objects() -> None:
    assert decode(b'[{"a": 1}, {"b": 2}]', "application/json; charset=utf-8") == ['{"a": 1}', '{"b": 2}']


def test_ndjson_keeps_lines_as_sent_and_skips_blank_ones() -> None:
    assert decode(b'{"a":1}\n\n{"b": 2}\r\n', "application/x-ndjson") == ['{"a":1}', '{"b": 2}']


@pytest.mark.parametrize(
    "line",
    [
        b'{"big": 123456789012345678901234567890}',  # past 64 bits, which JSONB takes
        b'{"lone": "\\ud800"}',  # an escaped lone surrogate: orjson refuses it, json takes it
        b'{"deep": ' + b"[" * 500 + b"]" * 500 + b"}",
    ],
)
def test_what_the_standard_library_accepts_is_accepted(line: bytes) -> None:
    """orjson parses first (decoding.py); where it refuses, the standard library decides."""
    assert decode(line, "application/x-ndjson") == [line.decode()]
    assert decode(line, "application/json") == [line.decode()]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"a": ', "malformed JSON"),
        (b'{"a": Infinity}', "Infinity is not valid JSON"),
        (b'{"a": -Infinity}', "-Infinity is not valid JSON"),
        (b"", "empty"),
        (b"[]", "empty array"),
        (b'[{"a": 1}, 3]', "index 1 is a number"),
        (b'"text"', "not a string"),
        (b'{"a": NaN}', "NaN is not valid JSON"),
        (b'{"a": "\xff"}', "UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_json_rejections_say_why(body: bytes, fragment: str) -> None:
    with pytest.raises(Invalid) as info:
        decode(body, "application/json")
    assert fragment.replace("not a string", "a string") in str(info.value)


def test_malformed_json_reports_line_and_column() -> None:
    with pytest.raises(Invalid) as info:
        decode(b'{\n "a": }', "application/json")
    assert info.value.detail == {"line": 2, "column": 7}


def test_ndjson_names_the_bad_line() -> None:
    with pytest.raises(Invalid) as info:
        decode(b'{"a": 1}\n[1]\n', "application/x-ndjson")
    assert str(info.value) == "line 2 is an array, not an object"
    assert info.value.detail == {"line": 2}
    with pytest.raises(Invalid, match="line 3: malformed JSON"):
        decode(b'{"a": 1}\n\n{oops}\n', "application/x-ndjson")


@pytest.mark.parametrize("content_type", ["text/plain", "", "application/x-www-form-urlencoded"])
def test_other_content_types_are_unsupported(content_type: str) -> None:
    with pytest.raises(Unsupported):
        decode(b'{"a": 1}', content_type)


def test_non_utf8_charset_is_unsupported() -> None:
    with pytest.raises(Unsupported, match="charset"):
        media_type("application/json; charset=latin-1")


def test_gzip_and_deflate_round_trip() -> None:
    body = json.dumps([{"n": n} for n in range(100)]).encode()
    assert decompress(gzip.compress(body), "gzip", 10_000) == body
    assert decompress(zlib.compress(body), "deflate", 10_000) == body
    assert decompress(body, "", 10) == body  # identity: the raw limit is checked by the listener


def test_decompressed_size_is_limited() -> None:
    bomb = gzip.compress(b" " * 1_000_000)
    assert len(bomb) < 10_000
    with pytest.raises(TooLarge):
        decompress(bomb, "gzip", 100_000)


def test_bad_gzip_is_invalid_and_unknown_encoding_unsupported() -> None:
    with pytest.raises(Invalid):
        decompress(b"not gzip", "gzip", 1000)
    with pytest.raises(Invalid, match="truncated"):
        decompress(gzip.compress(b'{"a": 1}')[:-10], "gzip", 1000)
    with pytest.raises(Unsupported):
        decompress(b"x", "br", 1000)


def test_ndjson_invalid_utf8_names_the_line() -> None:
    with pytest.raises(Invalid, match="line 2: not valid UTF-8"):
        decode(b'{"a": 1}\n{"b": "\xff"}\n', "application/x-ndjson")
