"""The operator's endpoints: /healthz, /readyz, /metrics (behind its token, added up across
--workers) and /openapi.json. Nothing here touches the pipeline: each reads what it is given."""

from __future__ import annotations

import hmac
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.aiohttp import make_aiohttp_handler

from ingest.errors import Unauthorized
from ingest.http.context import CONFIG, Handler, RouteConfig

# The API's contract, shipped in the package; read once, served as it is.
_OPENAPI = (Path(__file__).with_name("openapi.json")).read_bytes()


async def openapi(_request: web.Request) -> web.Response:
    return web.Response(body=_OPENAPI, content_type="application/json")


def protected_metrics(config: RouteConfig) -> Handler:
    serve = make_aiohttp_handler(config.metrics.registry) if config.merge_metrics is None else _merged_metrics(config)
    if config.metrics_token is None:
        return serve
    expected = f"Bearer {config.metrics_token}".encode()

    async def metrics(request: web.Request) -> web.StreamResponse:
        presented = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(presented, expected):
            raise Unauthorized("/metrics needs Authorization: Bearer <metrics token>")
        return await serve(request)

    return metrics


def _merged_metrics(config: RouteConfig) -> Handler:
    merge = config.merge_metrics
    assert merge is not None

    async def metrics(_request: web.Request) -> web.Response:
        text = await merge(generate_latest(config.metrics.registry).decode())
        return web.Response(text=text, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return metrics


async def healthz(request: web.Request) -> web.Response:
    healthy = request.app[CONFIG].is_healthy()
    return web.json_response({"healthy": healthy}, status=200 if healthy else 503)


async def readyz(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    reason = config.not_ready()
    ready = reason is None
    body: dict[str, object] = {"ready": ready}
    if reason is not None:
        body["reason"] = reason
    if config.unprotected_warning is not None:
        body["warning"] = config.unprotected_warning
    return web.json_response(body, status=200 if ready else 503)
