"""The HTTP API: the message and receipt handlers and the error → status table. Runs on the
listener's event loop (the operator's endpoints are in operations.py).

Nothing here blocks the loop: messages go in through the intake port (intake.py), which waits
for room off the loop, and a client waiting for its commit awaits its request's future (the
receipt, messages.py) through `asyncio.wrap_future`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from aiohttp import hdrs, web

from ingest.errors import (
    Backpressure,
    Invalid,
    Rejected,
    RequestTimeout,
    ShuttingDown,
    Unauthorized,
    first_line,
)
from ingest.http.auth import UNKNOWN
from ingest.http.body import read_body
from ingest.http.context import CONFIG, Handler, RouteConfig, error_response
from ingest.http.decoding import decode, decompress
from ingest.http.identity import IDEMPOTENCY_HEADER, checked_key, from_field, from_key
from ingest.http.operations import healthz, openapi, protected_metrics, readyz
from ingest.messages import CommitTimeout, Message, WriteFailed
from ingest.metrics import ANONYMOUS
from ingest.receipts import REQUEST_ID_HEADER, is_sane
from ingest.vocabulary import ACK_MODES

log = logging.getLogger(__name__)


def make_app(config: RouteConfig) -> web.Application:
    # client_max_size bounds the raw body; decompress() bounds it again after inflating.
    app = web.Application(
        client_max_size=config.max_body_bytes, middlewares=[errors_to_json]
    )
    app[CONFIG] = config
    app.router.add_post("/messages", _routed_post_messages)
    app.router.add_get("/requests/{id}", get_request)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", protected_metrics(config))
    app.router.add_get("/openapi.json", openapi)
    return app


@web.middleware
async def errors_to_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    return await _answer(request.app[CONFIG], request, handler)


def hot_path(config: RouteConfig) -> Callable[[Handler], Handler]:
    """Wraps aiohttp's request handler: POST /messages goes straight to its handler, anything
    else on to the application (router, then errors_to_json).

    Resolving the route and running the middleware chain cost every request about 11 µs of the
    listener's CPU (profiled under bench/run.py: 51 → 40 µs a request with an empty handler),
    about a sixth of what a 1-message request costs. Both ways pass through the same `_answer`,
    so a request's reply does not depend on the way it took. A request with `Expect` takes the
    application's way, which answers 100-continue.
    """
    async def post(request: web.Request) -> web.Response:
        return await post_messages(config, request)

    def wrap(application: Handler) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            if request.method == "POST" and request.path == "/messages" and hdrs.EXPECT not in request.headers:
                return await _answer(config, request, post)
            return await application(request)

        return handle

    return wrap


async def _answer(config: RouteConfig, request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one table from errors to status codes; also counts every response by code, and stops
    the connection's header clock (guard.py) while the request is handled."""
    metrics = config.metrics
    guarded = config.guard.request_started(request)
    try:
        response = await handler(request)
    except Rejected as exc:
        metrics.rejected.labels(exc.reason, _label(config, request)).inc(exc.messages)
        response = error_response(exc.status, str(exc), exc.detail)
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = "Bearer"
        if isinstance(exc, RequestTimeout):
            response.force_close()  # the rest of the body may still be on its way
    except Backpressure as exc:  # 503, or 429 for a client over its rate limit
        metrics.rejected.labels(exc.reason, _label(config, request)).inc(exc.messages)
        response = error_response(exc.status, str(exc), retry_after_s=exc.retry_after_s)
    except CommitTimeout as exc:  # a stream buffer's writers did not report the commit in time
        response = error_response(504, f"{exc}; the messages are kept in the stream: the request's receipt "
                                       "tells when they are stored", {"request": exc.request_id})
        if exc.request_id is not None:
            response.headers[REQUEST_ID_HEADER] = exc.request_id
    except WriteFailed as exc:
        detail = {"stored": exc.stored, "failed": exc.failed, "request": exc.request_id}
        response = error_response(500, f"write failed: {exc}", detail)
        if exc.request_id is not None:
            response.headers[REQUEST_ID_HEADER] = exc.request_id
    except web.HTTPException as exc:
        response = error_response(exc.status, exc.reason)
        # aiohttp's own headers say something (Allow on a 405): keep them, not its body's.
        for name, value in exc.headers.items():
            if name.lower() not in ("content-type", "content-length"):
                response.headers[name] = value
    except Exception:
        log.exception("handler for %s %s failed", request.method, request.path)
        response = error_response(500, "internal error; see the service log")
    finally:
        config.guard.request_done(guarded)
    metrics.count_response(response.status)
    return response


async def _routed_post_messages(request: web.Request) -> web.Response:
    # The router's way to the same handler: for a request with Expect (see hot_path).
    return await post_messages(request.app[CONFIG], request)


async def post_messages(config: RouteConfig, request: web.Request) -> web.Response:
    client = _client(config, request)
    # Parsed only when there is one: an empty query cost every request 2,200 instructions (callgrind).
    ack_mode = request.query.get("ack", config.default_ack) if "?" in request.raw_path else config.default_ack
    if ack_mode not in ACK_MODES:
        raise Invalid(f"ack must be enqueue or commit, not {ack_mode!r}")
    if config.is_stopping():
        raise ShuttingDown("service is shutting down")
    raw = await read_body(request, config.max_body_bytes, config.body_timeout_s)
    texts = decode(
        decompress(raw, request.headers.get("Content-Encoding", ""), config.max_body_bytes),
        request.headers.get("Content-Type", ""),
    )
    if config.rate_limiter is not None:
        # Keyed by client name, or by address without tokens (a proxy in front makes that one key).
        key = client if config.tokens is not None else (request.remote or "?")
        config.rate_limiter.take(key, len(texts))
    idents, known = _identities(config, request, texts)
    received_at = time.time()
    receipt = config.ledger.open(
        request.headers.get(REQUEST_ID_HEADER), len(texts), received_at, waited_on=ack_mode == "commit",
        client=client if config.tokens is not None else None,
    )
    request_id = receipt.id
    if len(texts) == 1:  # most requests under load: no comprehension to build and run
        batch = [Message(texts[0], received_at, ident=idents[0], known=known, receipt=receipt)]
    else:
        batch = [
            Message(text, received_at, ident=ident, known=known, receipt=receipt)
            for text, ident in zip(texts, idents, strict=True)
        ]
    try:
        await config.intake.submit(batch)
    except BaseException:
        config.ledger.withdraw(receipt)
        raise
    config.metrics.count_received(client, len(batch))
    if receipt.future is None:
        return _json_reply(202, f'{{"accepted": {len(batch)}, "request": "{request_id}"}}', request_id)
    try:
        stored, duplicates = await asyncio.wrap_future(receipt.future)
    except WriteFailed as exc:
        exc.request_id = request_id
        raise
    body = f'{{"stored": {stored}, "duplicates": {duplicates}, "request": "{request_id}"}}'
    return _json_reply(201, body, request_id)


async def get_request(request: web.Request) -> web.Response:
    """A receipt: the database's counts, or this process's while the request is in flight here.
    With tokens, only for the client that sent the request: any other gets the 404 of an unknown id."""
    config = request.app[CONFIG]
    client = _client(config, request)  # whoever may push may ask, for their own requests
    owner = client if config.tokens is not None else None
    request_id = request.match_info["id"]
    if not is_sane(request_id):
        return _unknown_request(request_id)
    # Asked before the database: a consumer may commit the last of it, and drop it from the
    # ledger, while the database is being asked.
    in_flight = config.ledger.lookup(request_id, owner)
    try:
        counts = await asyncio.wait_for(
            asyncio.get_running_loop().run_in_executor(config.lookups, config.lookup_receipt, request_id, owner),
            config.lookup_timeout_s,
        )
    except Exception as exc:  # noqa: BLE001 - a database that does not answer: say what we know here
        log.warning("receipt lookup of %s failed: %s", request_id, first_line(exc))
        counts = config.ledger.lookup(request_id, owner) or in_flight
        if counts is None:
            return error_response(503, "the database did not answer; try again", retry_after_s=5)
        return web.json_response(counts.as_json(request_id))
    if counts is None:  # nothing of it committed yet: accepted here, or not known
        counts = config.ledger.lookup(request_id, owner) or in_flight
    if counts is None:
        return _unknown_request(request_id)
    return web.json_response(counts.as_json(request_id))


def _unknown_request(request_id: str) -> web.Response:
    return error_response(
        404,
        "no such request: nothing of it is in the database, and it is not in flight on this replica",
        {"request": request_id},
    )


def _client(config: RouteConfig, request: web.Request) -> str:
    """The client's name from its bearer token; Unauthorized without a valid one."""
    client = _label(config, request)
    if client == UNKNOWN:  # a reserved name: no token file may use it
        raise Unauthorized("missing or unknown token: send Authorization: Bearer <token>")
    return client


def _label(config: RouteConfig, request: web.Request) -> str:
    """The client label of a refused request: its name if its token is valid, else `unknown`.
    Asked again rather than stored, since only refusals need it."""
    tokens = config.tokens
    if tokens is None:
        return ANONYMOUS
    return tokens.client(request.headers.get("Authorization")) or UNKNOWN


def _identities(config: RouteConfig, request: web.Request, texts: list[str]) -> tuple[Sequence[str | None], bool]:
    """Each message's identity, and whether it may be stored already (not if freshly generated).

    Without a key, a field or a spool, no second copy of a message can ever reach the store, so
    it needs no identity to be remembered by (and the write path stays as fast as without one).
    """
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None:
        key = checked_key(key)  # checked even where --id-field decides: a bad key is a client bug
    if config.id_field is not None:
        return from_field(texts, config.id_field), True
    if key is not None:
        return from_key(key, len(texts)), True
    if config.intake.assigns_identities:  # e.g. a spool re-sends what a crash left uncertain
        return config.identities.take(len(texts)), False
    return [None] * len(texts), False


def _json_reply(status: int, text: str, request_id: str) -> web.Response:
    # The hot path's replies are a few integers and a request id of safe characters (receipts.py):
    # no need for json.dumps on every request.
    return web.Response(
        status=status, text=text, content_type="application/json", headers={REQUEST_ID_HEADER: request_id}
    )


