"""The listener thread: an aiohttp server on an asyncio loop of its own (the producer).

The thread publishes its bound port, or the error that kept it from binding, on `started`, so
the main thread turns "address in use" into a one-line error instead of a dead thread.

The loop is uvloop's by default (`--event-loop`): with 1-message requests the standard loop's
own Python code (its selector, handles and transports) was an eighth of the service's work, and
libuv's loop does that work in C. Measured with callgrind on the whole process: 328,000 → 284,000
instructions a request; under wrk with `--workers 2`, 6-10 % less CPU a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, cast

from aiohttp import web

from ingest.errors import StartupError
from ingest.http.guard import ConnectionGuard

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(name: str) -> LoopFactory:
    """The event loop `name` ("uvloop" or "asyncio") makes; StartupError when uvloop is missing
    (it has no build for Windows), so that serve says so before anything starts."""
    if name == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError as exc:
        raise StartupError(f"event loop uvloop: {exc}; install uvloop, or give --event-loop asyncio") from exc
    return cast(LoopFactory, uvloop.new_event_loop)


class ListenerThread(threading.Thread):
    def __init__(
        self, app: web.Application, host: str, port: int, shutdown_timeout_s: float, *,
        guard: ConnectionGuard, keepalive_timeout_s: float = 15.0, ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False, private_metrics: tuple[str, Callable[[], bytes]] | None = None,
        hot_path: Callable[[Handler], Handler] | None = None, new_loop: LoopFactory = asyncio.new_event_loop,
    ) -> None:
        # Non-daemon: its handlers may still be answering clients whose messages are committing.
        super().__init__(name="listener", daemon=False)
        self._app = app
        self._host = host
        self._port = port
        self._shutdown_timeout_s = shutdown_timeout_s
        self._ssl_context = ssl_context
        self._guard = guard
        self._keepalive_timeout_s = keepalive_timeout_s
        self._reuse_port = reuse_port  # --workers: every worker process binds the same port
        self._private_metrics = private_metrics  # (unix socket path, exposition) for the other workers
        self._hot_path = hot_path  # routes.hot_path: wraps the application's request handler
        self._new_loop = new_loop
        self.started: Future[int] = Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"ListenerThread({self._host}:{self._port}, alive={self.is_alive()})"

    @property
    def event_loop(self) -> str | None:
        """The package of the loop it runs on ("uvloop" or "asyncio"); None before it starts."""
        return None if self._loop is None else type(self._loop).__module__.partition(".")[0]

    def run(self) -> None:
        with asyncio.Runner(loop_factory=self._new_loop) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        # No access log: at thousands of requests a second it would cost more than the work.
        runner = web.AppRunner(
            self._app,
            handle_signals=False,
            access_log=None,
            auto_decompress=False,  # routes.py inflates, with a limit on the inflated size
            shutdown_timeout=self._shutdown_timeout_s,
            keepalive_timeout=self._keepalive_timeout_s,
            # After a 408 the rest of a slow body is read for this long before the connection
            # closes (so the client sees the reply, not a reset); aiohttp's default is 10 s.
            lingering_time=2.0,
        )
        private: asyncio.AbstractServer | None = None
        try:
            await runner.setup()
            assert runner.server is not None
            if self._hot_path is not None:
                # The application's server makes web.Request objects (its request_factory),
                # though aiohttp types the handler for the base class.
                application = cast(Handler, runner.server.request_handler)
                runner.server.request_handler = cast(Any, self._hot_path(application))
            self._guard.wrap(runner.server)
            private = await self._serve_private_metrics()
            # Our own server instead of aiohttp's TCPSite, so that every connection passes the guard.
            server = await self._loop.create_server(
                self._guard, self._host, self._port, ssl=self._ssl_context, reuse_address=True, backlog=1024,
                reuse_port=self._reuse_port or None,
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            self.started.set_exception(exc)
            if private is not None:
                private.close()
            await runner.cleanup()
            return
        self.started.set_result(int(server.sockets[0].getsockname()[1]))
        self._guard.start()
        try:
            await self._stop_event.wait()
        finally:
            self._guard.stop()
            if private is not None:
                private.close()
            # Graceful: stop accepting, let in-flight handlers (clients awaiting commits) finish.
            server.close()
            await runner.cleanup()
            await server.wait_closed()

    async def _serve_private_metrics(self) -> asyncio.AbstractServer | None:
        """With --workers: this worker's own metrics on a unix socket, for the worker that is
        asked for /metrics to add up (metrics_merge.py)."""
        if self._private_metrics is None:
            return None
        path, exposition = self._private_metrics

        async def metrics(_request: web.BaseRequest) -> web.Response:
            return web.Response(body=exposition(), content_type="text/plain")

        assert self._loop is not None
        return await self._loop.create_unix_server(web.Server(metrics, access_log=None), path)

    def stop(self) -> None:
        """Ask the loop to finish; safe from any thread."""
        loop, stop = self._loop, self._stop_event
        if loop is not None and stop is not None and not loop.is_closed():
            # RuntimeError: the loop closed between the check and the call, so it is stopping.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
