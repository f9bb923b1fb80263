"""`ingest push`: a load generator that POSTs generated messages to a running service.

It speaks only HTTP and imports nothing from the server side, so it sees what a real client sees.
Pacing is a schedule (open loop), not "send when the last reply came back": a slow service shows
up as latency and catch-up, not as a quietly lower offered load.

This module is the sending loop; what to send and when is options.py, the bodies bodies.py, and
what a reply means replies.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import signal
import ssl
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple

import aiohttp
import yarl

from ingest.errors import ClientError, ConfigError

# Each `X as X` is a re-export: the CLI and tests know PushOptions, make_message, BACKOFF_CAP_S as push's.
from ingest.tools.bodies import encode_body, request_headers
from ingest.tools.bodies import make_message as make_message
from ingest.tools.options import PushOptions as PushOptions
from ingest.tools.options import due_s
from ingest.tools.replies import BACKOFF_CAP_S as BACKOFF_CAP_S
from ingest.tools.replies import backoff_s, describe_connection_error, describe_response, retry_after_s
from ingest.tools.report import PushSummary, Receipts

# Refusals before any HTTP reply mean "nothing listens there", not "restarting": give up early.
UNREACHABLE_AFTER_ATTEMPTS = 5
RECEIPT_SAMPLE = 100  # requests whose receipts --receipts checks
RECEIPT_POLL_S = 0.5


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
                    workers = [group.create_task(self._worker(session, started_s))
                               for _ in range(min(self.options.concurrency, requests))]
                    self._stop_on_signals(workers)
            except* ClientError as errors:
                raise errors.exceptions[0] from None
            finally:
                self._stop_on_signals(None)
            self.summary.elapsed_s = loop.time() - started_s
            if self.options.receipts:
                self.summary.receipts = await self._check_receipts(session)
        return self.summary

    def _stop_on_signals(self, workers: list[asyncio.Task[None]] | None) -> None:
        """SIGTERM or SIGINT ends the run with its summary: `docker compose stop` of the load
        profile killed the pusher before it printed one (issue 19). In the main thread only (where
        the loop can take signals); None puts the default handling back."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            if workers is None:
                loop.remove_signal_handler(signum)
            else:
                loop.add_signal_handler(signum, self._stop, signal.Signals(signum).name, workers)

    def _stop(self, name: str, workers: list[asyncio.Task[None]]) -> None:
        self.summary.stopped_by = name
        for worker in workers:
            worker.cancel()  # a TaskGroup lets a cancelled child go; the run ends with what it has

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
