"""A request's body, read within its limits: the byte bound (also for a chunked body) and the
body timeout, so a slow or oversized client holds no more than it may."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ingest.errors import RequestTimeout, TooLarge


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    """The raw body; over `limit` is TooLarge, whether Content-Length says so or the read finds
    out; not all there within `timeout_s` is RequestTimeout (a slow client holds no more)."""
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    content = request.content
    if content.is_eof():  # all of it is here (the usual case for a small body)
        # Taken as it lies in the buffer: request.read() awaits twice and copies twice to find
        # that out, which cost a 1-message request 3-4 µs of the listener (measured in place).
        raw = content.read_nowait()
        if len(raw) > limit:  # chunked: no Content-Length said so
            raise _too_large(limit)
        return raw
    try:
        async with asyncio.timeout(timeout_s):  # a timer, not a task a request as wait_for makes
            return await request.read()
    except web.HTTPRequestEntityTooLarge:  # a chunked body, past client_max_size
        raise _too_large(limit) from None
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {timeout_s:g} s") from None


def _too_large(limit: int) -> TooLarge:
    return TooLarge(f"body is over {limit} bytes", {"limit": limit})
