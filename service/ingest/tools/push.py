"""`ingest push`: a load generator that POSTs generated messages to a running service.

It speaks only HTTP and imports nothing from the server side, so it sees what a real client sees.
Pacing is a schedule (open loop), not "send when the last reply came back": a slow service shows
up as latency and catch-up, not as a quietly lower offered load.
"""

from __future__ import annotations

import asyncio
import gzip as gzip_codec
import json
import math
import random
import ssl
import uuid
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

import aiohttp
import yarl

from ingest.errors import ClientError, ConfigError
from ingest.tools.report import PushSummary, Receipts
from ingest.vocabulary import ACK_MODES

BURST_INTERVAL_S = 1.0
RETRY_AFTER_DEFAULT_S = 1.0
RETRY_AFTER_CAP_S = 30.0
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 5.0
# Refusals before any HTTP reply mean "nothing listens there", not "restarting": give up early.
UNREACHABLE_AFTER_ATTEMPTS = 5
ERROR_TEXT_LIMIT = 200
SENSORS = 16
RECEIPT_SAMPLE = 100  # requests whose receipts --receipts checks
RECEIPT_POLL_S = 0.5


@dataclass(frozen=True, kw_only=True)
class PushOptions:
    """What to send and how fast; checked on construction, so a bad value fails before any I/O.

    Pacing, counted from the start of the run: with `rate`, message n is due at n / rate s. With
    `burst`, `burst` extra messages are due at once at the start and every BURST_INTERVAL_S (1 s)
    after; with `burst` but no `rate`, the load is those bursts only. A request leaves when its
    first message is due; requests held back by `concurrency` or retries leave as soon as a slot
    frees, catching up with the schedule.
    """

    url: str
    count: int
    batch: int = 100
    concurrency: int = 16
    rate: float | None = None
    burst: int = 0
    ack: str = "enqueue"
    request_timeout_s: float = 60.0
    max_attempts: int = 50
    gzip: bool = False
    idempotent: bool = False  # an Idempotency-Key on every request, so any retry is safe
    token: str | None = None  # sent as Authorization: Bearer, for a service with --auth-tokens
    cacert: str | None = None  # a CA file to trust for https:// (a service with --tls-cert)
    receipts: bool = False  # at the end, check that a sample of the requests is stored
    receipt_timeout_s: float = 60.0  # how long the check waits for pending messages

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem is not None:
            raise ConfigError(f"push: {problem}")


def _problem(o: PushOptions) -> str | None:
    """The first thing wrong with `o`, as one line, or None."""
    rate_ok = o.rate is None or (o.rate > 0 and math.isfinite(o.rate))
    checks = (
        (o.url.startswith(("http://", "https://")), f"url must be http(s)://…, got {o.url!r}"),
        (o.count >= 0, f"count must be >= 0, got {o.count}"),
        (o.batch >= 1, f"batch must be >= 1, got {o.batch}"),
        (o.concurrency >= 1, f"concurrency must be >= 1, got {o.concurrency}"),
        (rate_ok, f"rate must be a positive number of messages/s, got {o.rate}"),
        (o.burst >= 0, f"burst must be >= 0, got {o.burst}"),
        (o.ack in ACK_MODES, f"ack must be one of {', '.join(ACK_MODES)}, got {o.ack!r}"),
        (o.request_timeout_s > 0, f"request_timeout_s must be > 0, got {o.request_timeout_s}"),
        (o.max_attempts >= 1, f"max_attempts must be >= 1, got {o.max_attempts}"),
        (o.receipt_timeout_s > 0, f"receipt_timeout_s must be > 0, got {o.receipt_timeout_s}"),
    )
    return next((message for ok, message in checks if not ok), None)


def due_s(
    seq: int, *, rate: float | None, burst: int, interval_s: float = BURST_INTERVAL_S
) -> float:
    """When message `seq` may leave, in seconds from the start (the model is in PushOptions)."""
    if rate is None:
        return 0.0 if burst == 0 else (seq // burst) * interval_s
    if burst == 0:
        return seq / rate
    # Merge the steady slots (one at each j / rate) with the burst slots (`burst` at each
    # i * interval_s): message `seq` takes the slot of rank `seq`, so find the first time, among
    # either kind of slot, by which more than `seq` slots exist.
    steady = bisect_left(
        range(seq + 1),
        True,
        key=lambda j: j + 1 + burst * (math.floor(j / rate / interval_s) + 1) > seq,
    )
    bursts = bisect_left(
        range(seq // burst + 1),
        True,
        key=lambda i: math.floor(i * interval_s * rate) + 1 + burst * (i + 1) > seq,
    )
    return min(steady / rate, bursts * interval_s)


def retry_after_s(header: str | None) -> float:
    """The wait a 503 asks for: delta-seconds only, capped so one reply cannot stall the run."""
    try:
        value = float(header) if header is not None else RETRY_AFTER_DEFAULT_S
    except ValueError:
        return RETRY_AFTER_DEFAULT_S
    if not math.isfinite(value):
        return RETRY_AFTER_DEFAULT_S
    return min(max(value, 0.0), RETRY_AFTER_CAP_S)


def backoff_s(attempt: int, jitter: float) -> float:
    """Capped exponential backoff after failed `attempt` (1-based); `jitter` in [0, 1] spreads it."""
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0 ** (attempt - 1)) * (0.5 + jitter / 2)


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


def client_ssl(cacert: str | None) -> ssl.SSLContext | bool:
    """True: the system's trust store; with `cacert`, that CA file instead (or ConfigError)."""
    if cacert is None:
        return True
    try:
        return ssl.create_default_context(cafile=cacert)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"push: cacert {cacert}: not a readable CA file: {exc}") from None


def messages_url(url: str, ack: str) -> str:
    return url.rstrip("/") + "/messages" + ("?ack=commit" if ack == "commit" else "")


def describe_response(status: int, body: bytes) -> str:
    """One line for a refused request: the service's JSON error, compacted, or its text."""
    try:
        text = json.dumps(json.loads(body), separators=(",", ":"))
    except ValueError:
        text = " ".join(body.decode("utf-8", "replace").split())
    if len(text) > ERROR_TEXT_LIMIT:
        text = text[: ERROR_TEXT_LIMIT - 1] + "…"
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


def describe_connection_error(exc: aiohttp.ClientConnectionError) -> str:
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    return str(exc) or type(exc).__name__


class _Reply(NamedTuple):
    status: int
    retry_after: str | None
    body: bytes
    latency_s: float
    request_id: str | None


class _Outcome(NamedTuple):
    """One attempt: `error` None means acknowledged; `retry_in_s` None means the error is final."""

    error: str | None
    retry_in_s: float | None = None
    latency_s: float = 0.0
    refused: bool = False  # a connection error, not an HTTP reply
    request_id: str | None = None  # of an acknowledged request, as the service named it


class _Push:
    """One run's shared state, so nothing about a run lives at module level."""

    def __init__(self, options: PushOptions, progress: Callable[[int, int], None] | None) -> None:
        self.options = options
        self.progress = progress
        self.summary = PushSummary(count=options.count)
        self.url = yarl.URL(messages_url(options.url, options.ack))
        self.ndjson = options.batch > 1
        self.headers = request_headers(ndjson=self.ndjson, gzip=options.gzip)
        if options.token is not None:
            self.headers["Authorization"] = f"Bearer {options.token}"
        # Workers share one iterator, so each request is taken exactly once, in seq order.
        self.firsts = iter(range(0, options.count, options.batch))
        self.reached = False  # any HTTP reply seen: later refusals mean "restarting"
        # Set when a request ran out of attempts on connection errors: the service is gone, so
        # stop instead of letting every remaining request spend its own max_attempts.
        self.gone: str | None = None
        self.random = random.Random()
        self.run_id = uuid.uuid4().hex[:12]  # with `idempotent`: the requests' keys are this run's
        self.sample: list[str] = []  # a uniform sample of acknowledged requests' ids (reservoir)
        self.sampled_from = 0

    def __repr__(self) -> str:
        s = self.summary
        return f"<push sent={s.sent} acked={s.acknowledged} retried={s.retried} failed={s.failed}>"

    async def run(self) -> PushSummary:
        loop = asyncio.get_running_loop()
        started_s = loop.time()
        self._report()
        requests = math.ceil(self.options.count / self.options.batch)
        connector = aiohttp.TCPConnector(limit=self.options.concurrency, ssl=client_ssl(self.options.cacert))
        timeout = aiohttp.ClientTimeout(total=self.options.request_timeout_s)
        # A load generator's own overhead caps what it can measure: no cookies, no response
        # decompression, the URL parsed once (see _Push.url).
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
        ) as session:
            try:
                async with asyncio.TaskGroup() as group:
                    for _ in range(min(self.options.concurrency, requests)):
                        group.create_task(self._worker(session, started_s))
            except* ClientError as errors:
                raise errors.exceptions[0] from None
            self.summary.elapsed_s = loop.time() - started_s
            if self.options.receipts:
                self.summary.receipts = await self._check_receipts(session)
        return self.summary

    async def _worker(self, session: aiohttp.ClientSession, started_s: float) -> None:
        loop = asyncio.get_running_loop()
        o = self.options
        for first in self.firsts:
            wait_s = started_s + due_s(first, rate=o.rate, burst=o.burst) - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            if self.gone is not None:
                return
            await self._deliver(session, first, min(o.batch, o.count - first))

    async def _deliver(self, session: aiohttp.ClientSession, first: int, size: int) -> None:
        """Send one request until it is acknowledged, finally refused, or out of attempts."""
        o = self.options
        body = encode_body(first, size, ndjson=self.ndjson, gzip=o.gzip, now=datetime.now(UTC))
        headers = self.headers
        if o.idempotent:
            headers = {**headers, "Idempotency-Key": f"push-{self.run_id}-{first}"}
        self.summary.sent += size
        outcome = _Outcome("not sent")
        for attempt in range(1, o.max_attempts + 1):
            if outcome.retry_in_s is not None:
                self.summary.waited_s += outcome.retry_in_s
                await asyncio.sleep(outcome.retry_in_s)
                if self.gone is not None:
                    return self._fail(size, self.gone)
                self.summary.retried += 1
            outcome = await self._attempt(session, body, headers, attempt)
            if outcome.error is None:
                return self._acknowledge(size, outcome.latency_s, outcome.request_id)
            if outcome.retry_in_s is None:
                return self._fail(size, outcome.error)
        error = f"{outcome.error} (gave up after {o.max_attempts} attempts)"
        if outcome.refused:
            self.gone = error
        self._fail(size, error)

    async def _attempt(
        self, session: aiohttp.ClientSession, body: bytes, headers: dict[str, str], attempt: int
    ) -> _Outcome:
        """One POST, classified: acknowledged, worth retrying after a wait, or a final failure."""
        try:
            reply = await self._post(session, body, headers)
        except TimeoutError:
            error = f"no reply within {self.options.request_timeout_s:g} s"
            if self.options.idempotent:  # the key makes a second copy impossible: try again
                return _Outcome(error, backoff_s(attempt, self.random.random()))
            # The service may still take it: a retry could duplicate, an ack would be a guess.
            return _Outcome(error)
        except aiohttp.ClientConnectionError as exc:
            error = describe_connection_error(exc)
            self._give_up_if_unreachable(attempt, error)
            return _Outcome(error, backoff_s(attempt, self.random.random()), refused=True)
        except aiohttp.ClientError as exc:  # a reply we cannot read
            return _Outcome(f"{type(exc).__name__}: {exc}")
        self.reached = True
        if 200 <= reply.status < 300:
            return _Outcome(None, latency_s=reply.latency_s, request_id=reply.request_id)
        error = describe_response(reply.status, reply.body)
        return _Outcome(error, retry_after_s(reply.retry_after) if reply.status in (429, 503) else None)

    async def _post(self, session: aiohttp.ClientSession, body: bytes, headers: dict[str, str]) -> _Reply:
        loop = asyncio.get_running_loop()
        started_s = loop.time()
        async with session.post(self.url, data=body, headers=headers) as response:
            content = await response.read()
            retry_after = response.headers.get("Retry-After")
            request_id = response.headers.get("X-Request-Id")
            return _Reply(response.status, retry_after, content, loop.time() - started_s, request_id)

    def _give_up_if_unreachable(self, attempt: int, error: str) -> None:
        if not self.reached and attempt >= min(
            self.options.max_attempts, UNREACHABLE_AFTER_ATTEMPTS
        ):
            raise ClientError(f"cannot reach {self.options.url}: {error}")

    def _acknowledge(self, size: int, latency_s: float, request_id: str | None) -> None:
        self.summary.acknowledged += size
        self.summary.latencies_s.append(latency_s)
        if self.options.receipts and request_id is not None:
            self._keep_in_sample(request_id)
        self._report()

    def _keep_in_sample(self, request_id: str) -> None:
        """Reservoir sampling: every acknowledged request equally likely, memory bounded."""
        self.sampled_from += 1
        if len(self.sample) < RECEIPT_SAMPLE:
            self.sample.append(request_id)
            return
        slot = self.random.randrange(self.sampled_from)
        if slot < RECEIPT_SAMPLE:
            self.sample[slot] = request_id

    async def _check_receipts(self, session: aiohttp.ClientSession) -> Receipts:
        """Ask for each sampled receipt until it has settled or the wait runs out.

        A 404 counts as pending while the wait lasts: behind a proxy, another replica only
        knows a request once something of it is committed."""
        loop = asyncio.get_running_loop()
        started_s = loop.time()
        deadline_s = started_s + self.options.receipt_timeout_s
        receipts = Receipts(requests=self.sampled_from, checked=len(self.sample))
        waiting = list(self.sample)
        last: dict[str, dict[str, int] | None] = {}
        while waiting:
            results = await asyncio.gather(*(self._receipt(session, request_id) for request_id in waiting))
            last.update(zip(waiting, results, strict=True))
            waiting = [r for r, counts in zip(waiting, results, strict=True) if counts is None or counts["pending"]]
            if not waiting or loop.time() >= deadline_s:
                break
            await asyncio.sleep(RECEIPT_POLL_S)
        for counts in last.values():
            if counts is None:
                receipts.unknown += 1
            elif counts["dead_lettered"]:
                receipts.dead_lettered += 1
            elif counts["pending"]:
                receipts.pending += 1
            else:
                receipts.stored += 1
        receipts.waited_s = loop.time() - started_s
        return receipts

    async def _receipt(self, session: aiohttp.ClientSession, request_id: str) -> dict[str, int] | None:
        url = yarl.URL(self.options.url.rstrip("/")) / "requests" / request_id
        headers = {"Authorization": self.headers["Authorization"]} if "Authorization" in self.headers else None
        try:
            async with session.get(url, headers=headers) as response:
                if response.status != 200:
                    return None
                body = json.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        return {key: int(body[key]) for key in ("accepted", "stored", "dead_lettered", "pending")}

    def _fail(self, size: int, error: str) -> None:
        self.summary.failed += size
        self.summary.errors[error] = self.summary.errors.get(error, 0) + 1

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.summary.acknowledged, self.options.count)


def run(options: PushOptions, *, progress: Callable[[int, int], None] | None = None) -> PushSummary:
    """Push `options.count` messages and say how it went.

    `progress(acknowledged, total)` is called at the start and after each acknowledged request.
    Raises ClientError only if the service never replied at all (e.g. connection refused).
    """
    return asyncio.run(_Push(options, progress).run())
