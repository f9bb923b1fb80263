"""Request body → list of messages. Pure functions; every error names where it went wrong.

A message travels as the JSON text of one object, validated here and stored as received: the
database parses it once more, but the service never serializes it again (see bench/).

Parsing is orjson's first (a quarter of the standard library's time a message, profiled); what
orjson refuses, the standard library decides, so exactly what `json` accepts is accepted:
escaped lone surrogates, which orjson refuses, still are, and NaN and Infinity, which `json`
would take, are refused by both. tests/http/fuzz checks that orjson never
accepts what `json` refuses.
"""

from __future__ import annotations

import functools
import json
import zlib
from typing import Any

import orjson

from ingest.errors import Invalid, TooLarge, Unsupported

JSON_TYPES = frozenset({"application/json"})
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _refuse_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not, and neither does JSONB.
    raise ValueError(f"{name} is not valid JSON")


# One decoder for every call: json.loads with a keyword builds a new decoder each time, which
# cost more than the parsing itself for the short lines of NDJSON. A decoder has no state.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _loads(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return _DECODER.decode(text)  # the verdict, and the error message, are the standard library's


def decompress(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """Undo Content-Encoding, refusing output over `max_bytes` without inflating all of it."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise Unsupported(f"Content-Encoding {encoding!r} is not supported; use gzip or none")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise Invalid(f"body is not valid {encoding}: {exc}") from None
    if len(data) > max_bytes or inflater.unconsumed_tail:
        raise TooLarge(f"decompressed body is over {max_bytes} bytes", {"limit": max_bytes})
    if not inflater.eof:
        raise Invalid(f"body is truncated {encoding} data")
    return data


@functools.lru_cache(maxsize=64)  # clients send a handful of distinct headers; refusals are not kept
def media_type(content_type: str) -> str:
    """The bare media type, checking that any charset is UTF-8 (JSON has no other)."""
    kind, _, params = content_type.partition(";")
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "charset" and value.strip('"').lower() not in ("utf-8", "utf8"):
            raise Unsupported(f"charset {value!r} is not supported; send UTF-8")
    return kind.strip().lower()


def decode(body: bytes, content_type: str) -> list[str]:
    """Split a body into messages, each the JSON text of one object."""
    kind = media_type(content_type)
    if kind in JSON_TYPES:
        return decode_json(body)
    if kind in NDJSON_TYPES:
        return decode_ndjson(body)
    raise Unsupported(
        f"Content-Type {kind or '(none)'!r} is not supported; "
        "use application/json or application/x-ndjson"
    )


def decode_json(body: bytes) -> list[str]:
    """One JSON object (kept as sent), or an array of them (each re-encoded on its own)."""
    if not body.strip():
        raise Invalid("body is empty")
    try:
        text = body.decode().strip()
        value = _loads(text)
    except json.JSONDecodeError as exc:
        raise Invalid(f"malformed JSON: {exc.msg}", {"line": exc.lineno, "column": exc.colno}) from None
    except (ValueError, RecursionError) as exc:
        raise Invalid(f"malformed JSON: {_describe(exc)}") from None
    if isinstance(value, dict):
        return [text]
    if not isinstance(value, list):
        raise Invalid(f"body must be a JSON object or an array of objects, not {_kind(value)}")
    if not value:
        raise Invalid("body is an empty array: no messages")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise Invalid(f"message at index {index} is {_kind(item)}, not an object", {"index": index})
    return [json.dumps(item) for item in value]


def decode_ndjson(body: bytes) -> list[str]:
    """One JSON object a line, kept as sent; blank lines are skipped, line numbers start at 1."""
    try:
        lines = body.decode().split("\n")
    except UnicodeDecodeError:
        raise Invalid(_first_bad_utf8_line(body)) from None
    messages: list[str] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        try:
            value = _loads(text)
        except (ValueError, RecursionError) as exc:
            raise Invalid(f"line {number}: malformed JSON: {_describe(exc)}", {"line": number}) from None
        if not isinstance(value, dict):
            raise Invalid(f"line {number} is {_kind(value)}, not an object", {"line": number})
        messages.append(text)
    if not messages:
        raise Invalid("body has no messages")
    return messages


def _first_bad_utf8_line(body: bytes) -> str:
    for number, line in enumerate(body.split(b"\n"), start=1):
        try:
            line.decode()
        except UnicodeDecodeError:
            return f"line {number}: not valid UTF-8"
    return "body is not valid UTF-8"


def _describe(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    if isinstance(exc, UnicodeDecodeError):
        return "not valid UTF-8"
    return str(exc)


def _kind(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
