"""What `ingest push` sends: generated readings, encoded as request bodies with their headers.

Kept apart from the sending loop: bench/ reuses it to make the same readings, and it is tuned on
its own terms (the generator must not be the bottleneck of the load it measures).
"""

from __future__ import annotations

import gzip as gzip_codec
import math
from datetime import datetime

SENSORS = 16


def make_message(seq: int, now: datetime) -> dict[str, object]:
    """A plausible reading; `v` depends only on `seq`, so stored rows can be checked after a run."""
    return {
        "sensor": f"s-{seq % SENSORS}",
        "seq": seq,
        "v": round(20.0 + 5.0 * math.sin(seq / 10.0), 3),
        "ts": now.isoformat(timespec="milliseconds"),
    }


def _message_json(seq: int, ts: str) -> str:
    """make_message(seq, now) as compact JSON, formatted directly: the generator must not be
    the bottleneck of the load it measures (every field is a number or a plain ASCII string)."""
    v = round(20.0 + 5.0 * math.sin(seq / 10.0), 3)
    return f'{{"sensor":"s-{seq % SENSORS}","seq":{seq},"v":{v!r},"ts":"{ts}"}}'


def encode_body(first: int, size: int, *, ndjson: bool, gzip: bool, now: datetime) -> bytes:
    """Messages first..first+size-1 as NDJSON lines, or as one bare object when not `ndjson`."""
    if not ndjson and size != 1:
        raise ValueError(f"a JSON body holds one message, not {size}")
    ts = now.isoformat(timespec="milliseconds")
    lines = [_message_json(seq, ts) for seq in range(first, first + size)]
    body = ("\n".join(lines) + "\n" if ndjson else lines[0]).encode()
    return gzip_codec.compress(body, compresslevel=1, mtime=0) if gzip else body


def request_headers(*, ndjson: bool, gzip: bool) -> dict[str, str]:
    headers = {"Content-Type": "application/x-ndjson" if ndjson else "application/json"}
    if gzip:
        headers["Content-Encoding"] = "gzip"
    return headers
