"""The connection guard: what one client can hold of the listener is bounded.

aiohttp bounds neither how many connections are open nor how long a client may take to send a
request's headers, so clients that send a byte a second, or open connections and say nothing,
could hold file descriptors until there are none left. The guard wraps aiohttp's protocol
factory: a connection that has not delivered a complete request head within `header_timeout_s`
(counted from its opening, or from the end of its previous request) is closed. The clock is a
deadline on each connection, checked by one sweep a fraction of the timeout apart: starting and
stopping it costs a request two attribute writes, where a timer a request cost the listener 8 %
of its time (profiled).
Reading the body is bounded in routes.py, and idle keep-alive connections by aiohttp's own
keepalive timeout.

Past `max_connections` a new connection is told so, not dropped: a reset looks like a network
fault, where a 503 with Retry-After is a back-off every client knows. The answer costs little
and never needs aiohttp: its request head is waited for (at most REFUSAL_HEAD_BYTES, within
`refusal_timeout_s`), then a prepared 503 with `Connection: close` is written, the sending side
shut, and whatever the client still sends (its body) discarded until it closes or
REFUSAL_LINGER_S pass: closing with unread data would reset the connection under the answer.
At most `max_refusing` connections are being answered at once; past that, and for a connection
that sends no head in time, the connection is closed without a word.

It also makes the replies aiohttp's HTTP parser writes before any of ingest's code runs (headers
too long or too many, a bad chunk size, Content-Length with chunked) JSON like every other error:
aiohttp writes them as plain text from its RequestHandler.handle_error, so the guard builds a
subclass of that handler which answers the same status with a JSON body.

Everything here runs on the listener's event loop: no locks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from ingest.metrics import Metrics

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_REFUSING = 128  # connections over the cap being answered at once (each holds a descriptor)
REFUSAL_TIMEOUT_S = 2.0  # for the request head of a connection over the cap (less if header_timeout_s is)
REFUSAL_HEAD_BYTES = 16 * 1024  # read no more of a head than this before answering anyway
REFUSAL_LINGER_S = 1.0  # after the answer, for the client to read it and close
REFUSAL_DRAIN_BYTES = 256 * 1024  # discarded after the answer at most; then the connection closes


class ConnectionGuard:
    def __init__(
        self, *, max_connections: int, header_timeout_s: float, metrics: Metrics, max_refusing: int = MAX_REFUSING
    ) -> None:
        self._factory: Callable[[], asyncio.Protocol] | None = None
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.max_refusing = max_refusing
        self.refusal_timeout_s = min(REFUSAL_TIMEOUT_S, header_timeout_s)
        self._metrics = metrics
        self._open: dict[Any, _Guarded] = {}  # transport -> its guarded protocol
        self.refusing = 0  # connections over the cap being answered now
        self._sweeper: asyncio.TimerHandle | None = None
        self.sweep_interval_s = min(1.0, header_timeout_s / 4)
        # By then every connection that holds a place without sending a head has been closed.
        self.retry_after_s = math.ceil(header_timeout_s + self.sweep_interval_s)
        body = json.dumps({
            "error": f"too many connections: this service holds {max_connections} at most; "
            f"try again in {self.retry_after_s} s",
            "detail": {"max_connections": max_connections},
        }).encode()
        self.refusal = (
            f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {self.retry_after_s}\r\nConnection: close\r\n\r\n"
        ).encode() + body

    def __repr__(self) -> str:
        return f"ConnectionGuard(open={len(self._open)}/{self.max_connections}, refusing={self.refusing})"

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def wrap(self, server: web.Server) -> None:
        """Guard aiohttp's server (once its runner is set up), with JSON parser errors."""
        # The handler class is not a parameter of web.Server, so build it the way its __call__
        # does; aiohttp is pinned below 4, and a test covers each parser error.
        self._factory = lambda: _JsonErrors(server, loop=server._loop, **server._kwargs)

    def __call__(self) -> asyncio.Protocol:
        assert self._factory is not None, "wrap() the server first"
        return _Guarded(self, self._factory())

    def start(self) -> None:
        """Begin sweeping for connections past their header deadline (on the running loop)."""
        self._sweeper = asyncio.get_running_loop().call_later(self.sweep_interval_s, self._sweep)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for guarded in [g for g in self._open.values() if g.deadline is not None and g.deadline <= now]:
            guarded.too_slow()
        self._sweeper = loop.call_later(self.sweep_interval_s, self._sweep)

    def request_started(self, request: web.BaseRequest) -> _Guarded | None:
        """Stop the connection's header clock while its request is handled; hand the result to
        request_done(). Called by the one middleware (routes.py), not a middleware of its own:
        each middleware layer costs every request."""
        guarded = self._open.get(request.transport)
        if guarded is not None:
            guarded.deadline = None
        return guarded

    @staticmethod
    def request_done(guarded: _Guarded | None) -> None:
        if guarded is not None:
            guarded.arm()


class _JsonErrors(RequestHandler):
    """aiohttp's handler, with its own error replies (written before the app runs) as JSON."""

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs, and checks nothing was sent yet
        text = (message or "").strip().splitlines()
        error = text[0] if text and status != 500 else HTTPStatus(status).phrase
        reply = web.json_response({"error": error, "detail": None}, status=status)
        reply.force_close()
        return reply


class _Refusal:
    """One connection over the cap: wait for its request head, answer 503, close (module docstring)."""

    def __init__(self, guard: ConnectionGuard, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._guard = guard
        self._transport = transport
        self._tail = b""  # the last bytes seen, for a head's end split across reads
        self._bytes = 0
        self._answered = False
        guard.refusing += 1
        self._timer: asyncio.TimerHandle | None = loop.call_later(guard.refusal_timeout_s, self._time_up)
        self._loop = loop

    def data_received(self, data: bytes) -> None:
        self._bytes += len(data)
        if self._answered:  # the body, discarded
            if self._bytes > REFUSAL_DRAIN_BYTES:
                self._transport.close()
            return
        seen = self._tail + data
        if b"\r\n\r\n" in seen or self._bytes >= REFUSAL_HEAD_BYTES:
            self._answer()
        else:
            self._tail = seen[-3:]

    def _answer(self) -> None:
        self._answered = True
        self._bytes = 0
        self._guard._metrics.connections_refused.inc()
        transport = self._transport
        transport.write(self._guard.refusal)
        if transport.can_write_eof():
            transport.write_eof()  # the client sees the end of the answer, and closes its side
        self._cancel_timer()
        self._timer = self._loop.call_later(REFUSAL_LINGER_S, self._transport.close)

    def _time_up(self) -> None:
        self._timer = None
        self._guard._metrics.connections_closed.labels("too_many").inc()
        self._transport.close()

    def eof_received(self) -> bool:
        if not self._answered:
            self._cancel_timer()
            self._guard._metrics.connections_closed.labels("too_many").inc()
        return False  # the transport closes itself

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def connection_lost(self) -> None:
        self._cancel_timer()
        self._guard.refusing -= 1


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, with a limit on its count and a header clock."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.BaseTransport | None = None
        self._loop = asyncio.get_running_loop()
        self.deadline: float | None = None  # loop time by which a request head must be in; None: not timing
        self._admitted = False
        self._refusal: _Refusal | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        guard = self._guard
        if len(guard._open) >= guard.max_connections:
            # inner never learns of it: nothing to tear down there
            if guard.refusing < guard.max_refusing:
                # A stream transport (uvloop's are not subclasses of asyncio.Transport).
                self._refusal = _Refusal(guard, cast(asyncio.Transport, transport), self._loop)
                return
            guard._metrics.connections_closed.labels("too_many").inc()
            transport.close()
            return
        self._admitted = True
        guard._open[transport] = self
        self._inner.connection_made(transport)
        self.arm()

    def arm(self) -> None:
        self.deadline = self._loop.time() + self._guard.header_timeout_s

    def too_slow(self) -> None:
        self.deadline = None
        if self._transport is not None and not self._transport.is_closing():
            self._guard._metrics.connections_closed.labels("header_timeout").inc()
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            self._refusal.data_received(data)
            return
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._refusal is not None:
            return self._refusal.eof_received()
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline = None
        if self._refusal is not None:
            self._refusal.connection_lost()
            self._refusal = None
        if not self._admitted:
            return
        self._guard._open.pop(self._transport, None)
        self._inner.connection_lost(exc)
