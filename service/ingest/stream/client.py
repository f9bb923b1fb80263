"""The NATS connection and the JetStream API requests every role makes.

nats-py is asyncio: each role connects on a loop of its own (the listener's, or the writer's
feeder thread's) and reconnects for ever, across the cluster's servers. Stream and consumer
info are asked for as the server's JSON, unparsed: the status and the metrics read fields
(`first_ts`, the replicas' `current`) that nats-py's classes do not all keep.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError

from ingest.errors import StartupError, first_line
from ingest.stream.spec import DURABLE, StreamSpec

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2
API_TIMEOUT_S = 2.0
CLOSE_FLUSH_S = 2


class Missing(Exception):
    """The stream or its consumer does not exist."""


class Unavailable(RuntimeError):
    """JetStream answered 503: no meta leader or stream leader just now (forming, electing)."""


async def connect(servers: list[str], name: str, *, retry: bool = True) -> Client:
    """Connected to one of the servers; reconnecting for ever (`retry`) once connected."""

    nc = Client()

    async def error(exc: Exception) -> None:
        log.debug("nats: %s", first_line(exc))

    async def disconnected() -> None:
        if retry and not (nc.is_closed or nc.is_draining):
            log.warning("nats: disconnected; reconnecting")

    async def reconnected() -> None:
        log.info("nats: reconnected to %s", nc.connected_url.netloc if nc.connected_url else "?")

    try:
        await nc.connect(
            servers=servers, name=name, connect_timeout=CONNECT_TIMEOUT_S, reconnect_time_wait=1,
            max_reconnect_attempts=-1 if retry else 0, allow_reconnect=retry, error_cb=error,
            disconnected_cb=disconnected, reconnected_cb=reconnected,
        )
        return nc
    except (NatsError, OSError) as exc:
        raise StartupError(f"cannot connect to NATS at {','.join(servers)}: {first_line(exc)}") from None


async def close(nc: Client) -> None:
    """Flush what is buffered (a writer's last acks), then close; not nats-py's drain, which
    waits up to 30 s on subscriptions."""
    try:
        await nc.flush(timeout=CLOSE_FLUSH_S)
    except (NatsError, OSError, TimeoutError) as exc:
        log.warning("nats: flush before closing: %s", first_line(exc) or type(exc).__name__)
    finally:
        await nc.close()


async def api(nc: Client, subject: str, timeout_s: float = API_TIMEOUT_S) -> dict[str, Any]:
    """One JetStream API request; Missing for a 404 (no such stream or consumer)."""
    reply = await nc.request(f"$JS.API.{subject}", b"", timeout=timeout_s)
    answer: dict[str, Any] = json.loads(reply.data)
    error = answer.get("error")
    if error is not None:
        if error.get("code") == 404:
            raise Missing(str(error.get("description", "not found")))
        if error.get("code") == 503:
            raise Unavailable(f"JetStream API {subject}: {error.get('description', error)}")
        raise RuntimeError(f"JetStream API {subject}: {error.get('description', error)}")
    return answer


async def stream_info(nc: Client, spec: StreamSpec) -> dict[str, Any]:
    return await api(nc, f"STREAM.INFO.{spec.name}")


async def consumer_info(nc: Client, spec: StreamSpec) -> dict[str, Any]:
    return await api(nc, f"CONSUMER.INFO.{spec.name}.{DURABLE}")
