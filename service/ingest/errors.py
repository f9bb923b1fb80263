"""The one exception hierarchy of ingest.

    IngestError
    ├── ConfigError                 bad setting: exit code 2, one line
    ├── Rejected                    the client sent something we will not take (4xx)
    │   ├── Invalid                 400: malformed JSON, a non-object message
    │   ├── TooLarge                413: body over max_body_bytes (after decompression too)
    │   ├── Unauthorized            401: no valid bearer token
    │   ├── RequestTimeout          408: the body did not arrive within the body timeout
    │   ├── Unsupported             415: content type or encoding we do not read
    │   └── NotAListener            404: POST /messages to a writer (`ingest write`)
    ├── Backpressure                the service cannot take it now (503 + Retry-After)
    │   ├── QueueFull               no room in the buffer within enqueue_timeout
    │   ├── ShuttingDown            the service is draining
    │   ├── SpoolFull               the spool is at its byte bound
    │   ├── SpoolUnavailable        the spool could not commit (a full disk, an I/O error)
    │   ├── RateLimited             429: the client is over its rate limit
    │   ├── StreamFull              the NATS stream is at its byte bound (discard new)
    │   └── StreamUnavailable       no definite answer from the stream in time: outcome unknown
    ├── StoreError                  a batch could not be written
    │   ├── TransientStoreError     retry: connection lost, serialization failure, locked
    │   ├── PermanentStoreError     the database refuses the data: isolate and dead-letter
    │   └── WriteFailed             (messages.py) an ack=commit request's messages not all stored: 500
    │       └── CommitTimeout       (messages.py) no writer reported the commit in time (stream buffer): 504
    ├── SpoolError                  a spool file that is damaged, foreign or of another version
    ├── SchemaNotReady              the database is not at this ingest's schema revision
    ├── StartupError                the service could not start (bind, database, schema)
    │   ├── DatabaseUnreachable     the database did not answer at start (with a spool: waited for)
    │   └── StreamNotReady          (stream/admin.py) the NATS cluster cannot do JetStream work yet
    └── ClientError                 `ingest push` / `ingest top` could not reach or use a service

Each refusal names its `reason` (the label of ingest_messages_rejected_total; vocabulary.py reads
them off these classes). Driver errors are mapped into StoreError at one boundary (store.py), by
class, never by text. `first_line` shortens any error to one line, the one way ingest does.
"""

from __future__ import annotations

from typing import Any


class IngestError(Exception):
    """Base of every error ingest raises on purpose."""


class ConfigError(IngestError):
    """A setting has a value ingest cannot use."""


class Rejected(IngestError):
    """The request is refused for what it contains; `reason` is the metric label.

    `messages` is how many messages the refusal costs, when known (1 for a body that could not
    even be split into messages).
    """

    status = 400
    reason = "invalid"

    def __init__(self, message: str, detail: Any = None, messages: int = 1) -> None:
        super().__init__(message)
        self.detail = detail
        self.messages = messages


class Invalid(Rejected):
    status = 400
    reason = "invalid"


class TooLarge(Rejected):
    status = 413
    reason = "too_large"


class Unauthorized(Rejected):
    """No valid `Authorization: Bearer` token; the reply carries `WWW-Authenticate: Bearer`."""

    status = 401
    reason = "unauthorized"


class RequestTimeout(Rejected):
    """The body did not arrive within the body timeout; the connection is closed after the reply."""

    status = 408
    reason = "timeout"


class Unsupported(Rejected):
    status = 415
    reason = "unsupported"


class NotAListener(Rejected):
    """A writer (`ingest write`) takes messages from the stream, not from clients."""

    status = 404
    reason = "not_a_listener"


class Backpressure(IngestError):
    """The service cannot take the request now; the client should retry after `retry_after_s`."""

    status = 503
    reason = "queue_full"

    def __init__(self, message: str, retry_after_s: float = 1.0, messages: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.messages = messages


class QueueFull(Backpressure):
    reason = "queue_full"


class ShuttingDown(Backpressure):
    reason = "shutting_down"


class SpoolFull(Backpressure):
    reason = "spool_full"


class SpoolUnavailable(Backpressure):
    """The spool could not commit the request (a full disk, an I/O error): try again later."""

    reason = "spool_error"


class RateLimited(Backpressure):
    """A client sent more than its rate limit allows: 429, with Retry-After from its bucket."""

    status = 429
    reason = "rate_limited"


class StreamFull(Backpressure):
    """The stream refused the request: it holds --max-bytes of unstored requests (discard new)."""

    reason = "stream_full"


class StreamUnavailable(Backpressure):
    """The stream gave no definite answer in time (an election, quorum lost, no server): the
    request may or may not be in it. Retried with its Idempotency-Key it is stored once."""

    reason = "stream_unavailable"


class StoreError(IngestError):
    """A batch could not be written."""


class TransientStoreError(StoreError):
    """Worth retrying: the database may accept the same batch later."""


class PermanentStoreError(StoreError):
    """The database refuses the data itself; retrying cannot help."""


class SpoolError(IngestError):
    """The spool file cannot be used: damaged, foreign, or written by another format version."""


class SchemaNotReady(IngestError):
    """The database has no ingest schema, or one at another revision than this ingest's."""


class StartupError(IngestError):
    """The service could not start; the message says what to fix."""


class DatabaseUnreachable(StartupError):
    """The database did not answer the start's migration or schema check. With a spool the
    service starts anyway, accepting into the spool, and storing begins once it answers."""


class ClientError(IngestError):
    """A client command could not reach or use a service."""


def first_line(exc: BaseException) -> str:
    """An error in one line, enough to act on: the class (the driver's, under SQLAlchemy's
    wrapper) and the first line of its message. The one way ingest shortens an error for a log
    line, a 503's reason or a one-line exit; never an IndexError on an empty message."""
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip()
    return f"{type(original).__name__}: {text.splitlines()[0] if text else '(no message)'}"
