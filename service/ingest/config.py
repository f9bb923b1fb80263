"""Settings: the one place that knows option names, defaults and what a valid value is.

Values arrive from four sources, lowest first: defaults < config file (TOML) < environment
(`INGEST_*`) < command-line flags. click resolves the last three (ingest.cli, which builds its
options from `setting_specs()`); `Settings.from_mapping` validates the result once, so every stage
downstream receives plain, checked values.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from ingest.errors import ConfigError
from ingest.vocabulary import ACK_MODES, SPOOL_SYNC_MODES

EVENT_LOOPS = ("uvloop", "asyncio")
_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
SUPPORTED_DRIVERS = {"sqlite": ("", "pysqlite"), "postgresql": ("psycopg",)}

T = TypeVar("T")


def setting(default: T, help: str, *, flag: str | None = None) -> T:
    """A Settings field that also carries its command-line help; flag and env var follow from its name."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every setting of `ingest serve`, validated. Durations are seconds (`_s`)."""

    host: str = setting("127.0.0.1", "Address to listen on.")
    port: int = setting(8080, "Port to listen on (0: any free port).")
    db_url: str = setting("sqlite:///ingest.db", "sqlite:///file.db or postgresql+psycopg://user@host/db", flag="--db")
    consumers: int = setting(4, "Consumer threads writing batches.")
    workers: int = setting(
        1, "Processes sharing the port (SO_REUSEPORT), each a whole pipeline with --consumers threads; "
           "/metrics adds them up. More than 1 needs a fixed --port, and a spool directory with --spool.")
    pin_workers: bool = setting(
        False, "With --workers: each worker process keeps to one CPU of those this process may use (round robin), "
               "so its listener and consumers hand the GIL over on one core.")
    queue_size: int = setting(10_000, "Buffer capacity, in messages.")
    enqueue_timeout_s: float = setting(1.0, "Seconds a request waits for room before 503.")
    batch_size: int = setting(1000, "Most messages one transaction writes.")
    batch_linger_s: float = setting(0.05, "Seconds a consumer waits to fill a batch.")
    pool_size: int = setting(4, "Database connections (a BoundedSemaphore).")
    drain_timeout_s: float = setting(30.0, "Seconds shutdown may spend draining the buffer.")
    statement_timeout_s: float = setting(
        60.0, "Seconds a database call (a batch's write) may take; past it (plus 1 s) with no answer, "
              "its connection is cut and the write retried on a fresh one.")
    ack: str = setting("enqueue", "Default acknowledgement: enqueue (202) or commit (201 after the commit).")
    max_body_bytes: int = setting(1024 * 1024, "Largest request body, also after decompression.")
    auth_tokens: str | None = setting(
        None, "A file of name:token lines: POST /messages then needs Authorization: Bearer <token>. "
              "SIGHUP reloads it.")
    max_connections: int = setting(1000, "Client connections open at once; more are answered 503 and closed.")
    header_timeout_s: float = setting(10.0, "Seconds a connection has to send a request's headers.")
    body_timeout_s: float = setting(30.0, "Seconds a request has to send its body; then 408.")
    keepalive_timeout_s: float = setting(15.0, "Seconds an idle keep-alive connection stays open.")
    event_loop: str = setting(
        "uvloop", "The listener's asyncio loop: uvloop (libuv; a 1-message request costs the listener less CPU) "
                  "or asyncio (the standard library's).")
    rate_limit: float | None = setting(
        None, "Messages a second each client may send (by token name, or by address without tokens); "
              "over it, 429 with Retry-After.")
    rate_burst: float | None = setting(
        None, "Messages a client may send at once above its rate (default: one second's worth).")
    tls_cert: str | None = setting(None, "Serve HTTPS with this certificate (PEM; with --tls-key).")
    tls_key: str | None = setting(None, "The certificate's private key (PEM).")
    tls_client_ca: str | None = setting(
        None, "Mutual TLS: clients must present a certificate signed by this CA (PEM).")
    metrics_token: str | None = setting(
        None, "A token /metrics asks for (Authorization: Bearer). /healthz and /readyz stay open.")
    spool: str | None = setting(
        None, "A spool: reply 202 only once a request is on disk here, and absorb bursts larger than the queue. "
              "A directory (one that exists, or a path ending in /): each process keeps its own file in it and "
              "adopts the files of processes that are gone (not on a network filesystem). Otherwise one file "
              "(SQLite) for one process. Default: no spool, 202 means in memory.")
    spool_sync: str = setting(
        "full", "full: a 202 survives a power cut (fsync each commit); normal: it survives the process dying.")
    spool_max_bytes: int = setting(1024**3, "Bound of the spool; when full, requests get 503.")
    buffer: str = setting(
        "memory", "memory: 202 once in this process's buffer. nats://host:4222,nats://host2:4222,...: 202 once the "
                  "whole request is in a replicated NATS JetStream stream (`ingest stream init` makes it); with "
                  "--consumers 0 a listener only.")
    stream: str = setting("INGEST", "With a nats:// buffer: the stream's name (its subject: the name, lower case, "
                                    "then .requests).")
    stream_replicas: int = setting(3, "Replicas of the stream that `ingest stream init` makes (3 or 5 in production).",
                                   flag="--replicas")
    stream_max_bytes: int = setting(
        1024**3, "Bound of the stream (the unstored backlog), set by `ingest stream init`; when full, "
                 "requests get 503.",
        flag="--max-bytes")
    stream_ack_wait_s: float = setting(
        60.0, "Seconds a writer may hold a stream message unacknowledged before another writer gets it; "
              "set by `ingest stream init`.", flag="--ack-wait")
    commit_timeout_s: float = setting(
        60.0, "With a nats:// buffer: seconds an ack=commit request waits for a writer's commit; then 504 naming "
              "the request (its receipt tells).")
    id_field: str | None = setting(
        None, "A field of every message that is its identity: a message whose identity is stored is not stored "
              "again. Default: each message gets a new identity (or one from the request's Idempotency-Key).")
    migrate: bool = setting(True, "Upgrade the schema on start.")
    log_level: str = setting("info", "debug, info, warning or error.")

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> Settings:
        """Build and validate; unknown keys and bad values raise ConfigError naming the key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        given = {k: v for k, v in values.items() if v is not None}
        if isinstance(given.get("db_url"), str):
            given["db_url"] = normalize_db_url(given["db_url"])
        settings = cls(**given)
        settings.validate()
        return settings

    def validate(self) -> None:
        _check_port(self.port)
        if self.consumers < (0 if self.buffer_servers else 1):
            raise ConfigError(f"consumers must be at least {0 if self.buffer_servers else 1}, got {self.consumers}")
        for name in ("workers", "queue_size", "batch_size", "pool_size", "max_body_bytes",
                     "spool_max_bytes", "max_connections",
                     "stream_replicas", "stream_max_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s", "statement_timeout_s",
                     "stream_ack_wait_s", "commit_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be more than 0 seconds, got {getattr(self, name)}")
        for name in ("enqueue_timeout_s", "batch_linger_s", "drain_timeout_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.ack not in ACK_MODES:
            raise ConfigError(f"ack must be one of {', '.join(ACK_MODES)}, got {self.ack!r}")
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level must be debug, info, warning or error, got {self.log_level!r}")
        check_db_url(self.db_url)
        if self.spool_sync not in SPOOL_SYNC_MODES:
            raise ConfigError(f"spool_sync must be one of {', '.join(SPOOL_SYNC_MODES)}, got {self.spool_sync!r}")
        if self.spool is not None and not self.spool.strip():
            raise ConfigError("spool must be a file or directory path, got an empty one")
        for name in ("rate_limit", "rate_burst"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and value != float("inf")):
                raise ConfigError(f"{name} must be a positive number of messages, got {value}")
        if self.rate_burst is not None and self.rate_limit is None:
            raise ConfigError("rate_burst needs rate_limit")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: give both, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca needs tls_cert and tls_key: mutual TLS is TLS first")
        if self.metrics_token is not None and len(self.metrics_token) < 16:
            raise ConfigError("metrics_token must be at least 16 characters")
        if self.workers > 1 and self.port == 0:
            raise ConfigError("workers share one port: give --port (not 0) with --workers")
        if self.pin_workers and self.workers < 2:
            raise ConfigError("pin_workers pins worker processes to CPUs: give --workers 2 or more with it")
        if self.workers > 1 and self.spool is not None and self.spool_directory is None:
            raise ConfigError(f"a spool file has one writer: with --workers, give --spool a directory "
                              f"(e.g. {self.spool.rstrip('/')}.d/), where each worker keeps a file of its own")
        _check_buffer(self)
        if self.id_field is not None and not self.id_field.strip():
            raise ConfigError("id_field must name a field of the messages, got an empty name")

    @property
    def spool_directory(self) -> Path | None:
        """--spool as a directory: one that exists, or a path ending in `/` (made at start).
        Anything else is one spool file, as before directories."""
        if self.spool is None:
            return None
        path = Path(self.spool)
        return path if self.spool.endswith("/") or path.is_dir() else None

    @property
    def buffer_servers(self) -> list[str]:
        """The NATS servers of a nats:// buffer; empty for the memory buffer."""
        if self.buffer == "memory":
            return []
        return [url.strip() for url in self.buffer.split(",")]

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with the database password hidden, for display."""
        shown = dataclasses.asdict(self)
        shown["db_url"] = mask_url(self.db_url)
        if self.metrics_token is not None:
            shown["metrics_token"] = "***"
        return shown


@dataclass(frozen=True)
class SettingSpec:
    """How one setting appears outside the code: plain data, so this module needs no click."""

    name: str
    flag: str  # "--queue-size"; a bool is "--migrate/--no-migrate"
    envvar: str
    help: str
    default: Any
    type: type  # of the value, None aside: str, int, float or bool


def setting_specs() -> list[SettingSpec]:
    """Every setting in field order. The env var is INGEST_ + the name without its `_s` suffix."""
    hints = typing.get_type_hints(Settings)
    specs = []
    for field in dataclasses.fields(Settings):
        stem = field.name.removesuffix("_s")
        value_type = _value_type(hints[field.name])
        dashed = stem.replace("_", "-")
        flag = f"--{dashed}/--no-{dashed}" if value_type is bool else f"--{dashed}"
        specs.append(SettingSpec(
            name=field.name, flag=field.metadata.get("flag") or flag, envvar=f"INGEST_{stem.upper()}",
            help=field.metadata["help"], default=field.default, type=value_type,
        ))
    return specs


def _value_type(hint: object) -> type:
    """int from `int`, str from `str | None`."""
    types = [arg for arg in typing.get_args(hint) if arg is not type(None)] or [hint]
    if len(types) != 1 or not isinstance(types[0], type):
        raise TypeError(f"a setting holds one plain type, not {hint!r}")
    return types[0]


def _check_buffer(settings: Settings) -> None:
    servers = settings.buffer_servers
    if any(not url.startswith(("nats://", "tls://")) or url in ("nats://", "tls://") for url in servers):
        raise ConfigError(f"buffer must be memory or nats://host:port[,nats://host:port...], got {settings.buffer!r}")
    if servers and settings.spool is not None:
        raise ConfigError("buffer and spool: a request is kept by the stream or by the spool, not both; "
                          "give --buffer nats://... or --spool, not both")
    if not _STREAM_NAME.fullmatch(settings.stream):
        raise ConfigError(f"stream must be letters, digits, - and _, got {settings.stream!r}")


def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"port must be between 0 and 65535, got {port}")


def normalize_db_url(db_url: str) -> str:
    """postgresql:// and postgres:// (what libpq and most tools write) mean psycopg 3 here."""
    for prefix in ("postgresql://", "postgres://"):
        if db_url.startswith(prefix):
            return "postgresql+psycopg://" + db_url.removeprefix(prefix)
    return db_url


def check_db_url(db_url: str) -> URL:
    """Refuse URLs whose dialect or driver ingest does not ship, before anything connects."""
    try:
        url = make_url(db_url)
    except ArgumentError:
        raise ConfigError(f"db_url is not a database URL: {mask_url(db_url)!r}") from None
    drivers = SUPPORTED_DRIVERS.get(url.get_backend_name())
    if drivers is None or (url.drivername.partition("+")[2] not in drivers):
        raise ConfigError(
            f"db_url scheme {url.drivername!r} is not supported; "
            "use sqlite:///path.db or postgresql+psycopg://user@host/db"
        )
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        # Every pooled connection would get its own empty database: consumers could not write.
        raise ConfigError("db_url: in-memory SQLite is not supported; give a file, e.g. sqlite:///ingest.db")
    return url


def mask_url(db_url: str) -> str:
    try:
        return make_url(db_url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable url>"


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file into setting names; every key must be a known setting."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s): {', '.join(unknown)}")
    return data
