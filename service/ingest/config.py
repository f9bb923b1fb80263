"""Settings: the one place that knows option names, defaults and what a valid value is.

Values arrive from four sources, lowest first: defaults < config file (TOML) < environment
(`INGEST_*`) < command-line flags. click resolves the last three (cli.py); `Settings.from_mapping`
validates the result once, so every stage downstream receives plain, checked values.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from ingest.errors import ConfigError

ACK_MODES = ("enqueue", "commit")
SPOOL_SYNC_MODES = ("full", "normal")
EVENT_LOOPS = ("uvloop", "asyncio")
SUPPORTED_DRIVERS = {"sqlite": ("", "pysqlite"), "postgresql": ("psycopg",)}


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every setting of `ingest serve`, validated. Durations are seconds (`_s`)."""

    host: str = "127.0.0.1"
    port: int = 8080
    db_url: str = "sqlite:///ingest.db"
    consumers: int = 4
    workers: int = 1
    pin_workers: bool = False
    queue_size: int = 10_000
    enqueue_timeout_s: float = 1.0
    batch_size: int = 1000
    batch_linger_s: float = 0.05
    pool_size: int = 4
    drain_timeout_s: float = 30.0
    statement_timeout_s: float = 60.0
    ack: str = "enqueue"
    max_body_bytes: int = 1024 * 1024
    id_field: str | None = None
    auth_tokens: str | None = None
    max_connections: int = 1000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 15.0
    event_loop: str = "uvloop"
    rate_limit: float | None = None
    rate_burst: float | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    metrics_token: str | None = None
    spool: str | None = None
    spool_sync: str = "full"
    spool_max_bytes: int = 1024**3
    migrate: bool = True
    log_level: str = "info"

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
        for name in ("consumers", "workers", "queue_size", "batch_size", "pool_size", "max_body_bytes",
                     "spool_max_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s", "statement_timeout_s"):
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
            raise ConfigError("spool must be a file path, got an empty one")
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
        if self.workers > 1 and self.spool is not None:
            raise ConfigError("a spool has one writer: use --workers 1 with --spool (or one replica a spool)")
        if self.id_field is not None and not self.id_field.strip():
            raise ConfigError("id_field must name a field of the messages, got an empty name")

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with the database password hidden, for display."""
        shown = dataclasses.asdict(self)
        shown["db_url"] = mask_url(self.db_url)
        if self.metrics_token is not None:
            shown["metrics_token"] = "***"
        return shown


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
