"""`ingest stream init` (the stream's `db upgrade`), `ingest stream status`, and the start check
of `serve` and `write`. Each runs on a loop of its own, from the main thread, before anything else
starts, and ends in one line for a user's mistake (StartupError), never a traceback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.js.errors import APIError

from ingest.errors import StartupError, first_line
from ingest.stream import client
from ingest.stream.spec import DURABLE, StreamSpec

T = TypeVar("T")
INIT_HINT = "run `ingest stream init`"
# How long `stream init` waits for a cluster that is still forming (servers just started: no
# meta leader yet, or not all peers known), saying so each time it tries again.
INIT_WAIT_S = 60.0
INIT_RETRY_S = 1.0
# JetStream's answers while a cluster forms or elects: 503 "temporarily unavailable", and for an
# R=3 stream before three peers are known (or while one is offline) "no suitable peers for
# placement" and "insufficient resources".
_FORMING_ERR_CODES = frozenset({10005, 10008, 10023})


class StreamNotReady(StartupError):
    """The cluster answers, but cannot do JetStream work yet (forming, electing, quorum lost)."""


def _not_ready(exc: BaseException) -> bool:
    if isinstance(exc, (TimeoutError, NoRespondersError)):
        return True
    if isinstance(exc, APIError):
        return exc.code == 503 or exc.err_code in _FORMING_ERR_CODES
    return isinstance(exc, client.Unavailable)


def _run(spec: StreamSpec, work: Callable[[Client], Awaitable[T]], name: str) -> T:
    """Connect (once, no retries), do the work, close."""

    async def session() -> T:
        nc = await client.connect(spec.servers, name, retry=False)
        try:
            return await work(nc)
        except (NatsError, TimeoutError, RuntimeError) as exc:
            reason = first_line(exc) or type(exc).__name__
            error = StreamNotReady if _not_ready(exc) else StartupError
            raise error(f"stream {spec.name}: {reason}") from None
        finally:
            await nc.close()

    return asyncio.run(session())


def init(spec: StreamSpec, waiting: Callable[[str], None], wait_s: float = INIT_WAIT_S) -> list[str]:
    """Create or update the stream and its consumer; what was done, a line each. A cluster still
    forming is waited for (up to `wait_s`, `waiting` told why each time): compose starts
    `stream init` as soon as the servers answer their health check, before they have elected."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return _run(spec, lambda nc: _init(nc, spec), "ingest-stream-init")
        except StreamNotReady as exc:
            if time.monotonic() + INIT_RETRY_S > deadline:
                raise StartupError(f"{exc} (the cluster was not ready within {wait_s:g} s)") from None
            waiting(f"{exc}: the cluster is not ready yet, trying again")
            time.sleep(INIT_RETRY_S)


async def _init(nc: Client, spec: StreamSpec) -> list[str]:
    js = nc.jetstream(timeout=10)
    done = []
    try:
        existing = await client.stream_info(nc, spec)
    except client.Missing:
        await js.add_stream(spec.stream_config())
        done.append(f"stream {spec.name}: created (subject {spec.subject}, {spec.replicas} replicas, "
                     f"max {spec.max_bytes} bytes, workqueue, discard new, file storage)")
    else:
        changes = spec.stream_differences(existing["config"])
        if changes:
            await js.update_stream(spec.stream_config())
            done.append(f"stream {spec.name}: updated ({'; '.join(changes)})")
        else:
            done.append(f"stream {spec.name}: unchanged")
    try:
        consumer = await client.consumer_info(nc, spec)
    except client.Missing:
        await js.add_consumer(spec.name, spec.consumer_config())
        done.append(f"consumer {DURABLE}: created (durable pull, explicit acks, ack wait {spec.ack_wait_s:g} s)")
    else:
        changes = spec.consumer_differences(consumer["config"])
        if changes:
            await js.add_consumer(spec.name, spec.consumer_config())
            done.append(f"consumer {DURABLE}: updated ({'; '.join(changes)})")
        else:
            done.append(f"consumer {DURABLE}: unchanged")
    return done


@dataclass(frozen=True)
class Status:
    messages: int
    bytes: int
    max_bytes: int
    pending: int
    ack_pending: int
    redelivered: int
    leader: str | None
    replicas: int
    replicas_current: int
    oldest_age_s: float | None

    @classmethod
    def of(cls, stream: dict[str, Any], consumer: dict[str, Any] | None, now: float) -> Status:
        state, cluster = stream["state"], stream.get("cluster") or {}
        peers = cluster.get("replicas") or []
        # The leader is current by definition; followers say so themselves.
        current = (1 if cluster.get("leader") else 0) + sum(
            1 for p in peers if p.get("current") and not p.get("offline"))
        first = state.get("first_ts")
        oldest = _age(first, now) if state.get("messages") else None
        consumer = consumer or {}
        return cls(
            messages=int(state.get("messages", 0)), bytes=int(state.get("bytes", 0)),
            max_bytes=int(stream["config"].get("max_bytes", -1)), pending=int(consumer.get("num_pending", 0)),
            ack_pending=int(consumer.get("num_ack_pending", 0)), redelivered=int(consumer.get("num_redelivered", 0)),
            leader=cluster.get("leader"), replicas=int(stream["config"].get("num_replicas", 1)),
            replicas_current=current, oldest_age_s=oldest,
        )

    def format(self, name: str) -> str:
        share = f" ({100 * self.bytes / self.max_bytes:.1f} %)" if self.max_bytes > 0 else ""
        oldest = "none" if self.oldest_age_s is None else f"{self.oldest_age_s:.1f} s"
        return "\n".join([
            f"stream {name}",
            f"  messages:             {self.messages} (each one or more whole requests)",
            f"  bytes:                {self.bytes} of {self.max_bytes}{share}",
            f"  pending:              {self.pending} (not yet delivered to a writer)",
            f"  ack pending:          {self.ack_pending} (held by writers)",
            f"  redelivered:          {self.redelivered}",
            f"  leader:               {self.leader or 'none'}",
            f"  replicas current:     {self.replicas_current} of {self.replicas}",
            f"  oldest message age:   {oldest}",
        ])


def _age(timestamp: str | None, now: float) -> float | None:
    if not timestamp or timestamp.startswith("0001-"):
        return None
    # RFC 3339 with nanoseconds: fromisoformat takes at most microseconds.
    head, _, rest = timestamp.partition(".")
    fraction = rest.rstrip("Z")[:6]
    stamp = datetime.fromisoformat(f"{head}.{fraction or '0'}+00:00")
    return max(0.0, now - stamp.timestamp())


async def read_status(nc: Client, spec: StreamSpec) -> Status:
    stream = await client.stream_info(nc, spec)
    try:
        consumer: dict[str, Any] | None = await client.consumer_info(nc, spec)
    except client.Missing:
        consumer = None
    return Status.of(stream, consumer, time.time())


def status(spec: StreamSpec) -> Status:
    async def work(nc: Client) -> Status:
        try:
            return await read_status(nc, spec)
        except client.Missing:
            raise StartupError(f"stream {spec.name} does not exist: {INIT_HINT}") from None

    return _run(spec, work, "ingest-stream-status")


def check(spec: StreamSpec, *, writer: bool) -> None:
    """At the start of `serve` or `write`: the stream (and, for a writer, its consumer) as
    expected, and room in a server's max_payload for a whole request; StartupError otherwise."""

    async def work(nc: Client) -> None:
        if nc.max_payload < spec.max_msg_size:
            raise StartupError(
                f"NATS max_payload is {nc.max_payload} bytes, less than --max-body-bytes plus headers "
                f"({spec.max_msg_size}): raise max_payload on the servers (e.g. 2MB) or lower --max-body-bytes")
        try:
            stream = await client.stream_info(nc, spec)
        except client.Missing:
            raise StartupError(f"stream {spec.name} does not exist: {INIT_HINT}") from None
        config = stream["config"]
        wrong = spec.essential_differences(config)
        size = int(config.get("max_msg_size", -1))
        if 0 < size < spec.max_msg_size:
            wrong.append(f"max_msg_size is {size}, less than --max-body-bytes plus headers ({spec.max_msg_size})")
        if wrong:
            raise StartupError(f"stream {spec.name} is not as expected ({'; '.join(wrong)}): {INIT_HINT}")
        if writer:
            try:
                await client.consumer_info(nc, spec)
            except client.Missing:
                raise StartupError(f"stream {spec.name} has no consumer {DURABLE}: {INIT_HINT}") from None

    _run(spec, work, "ingest-start-check")
