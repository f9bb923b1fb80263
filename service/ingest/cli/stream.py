"""The stream buffer's commands (--buffer nats://): `stream init`, `stream status` and `write`.

`stream init` is the stream's `db upgrade`: it creates or updates the stream and the writers'
durable consumer, idempotently, and says what it did. `write` runs a writer only: stream →
buffer → consumer threads → database, its port serving /metrics, /healthz and /readyz.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from ingest.cli.common import EXIT_USAGE, Decorator, fail, setting_option, settings_options
from ingest.config import Settings

_STREAM_SETTINGS = ("buffer", "stream", "stream_replicas", "stream_max_bytes", "stream_ack_wait_s", "max_body_bytes")


def _stream_options(command: Any) -> Any:
    options: list[Decorator] = [setting_option(name) for name in _STREAM_SETTINGS]
    for option in reversed(options):
        command = option(command)
    return command


def _stream_settings(values: dict[str, Any]) -> Settings:
    settings = Settings.from_mapping(values)
    if not settings.buffer_servers:
        fail("give the NATS servers: --buffer nats://host:4222[,nats://host2:4222...] (or INGEST_BUFFER)", EXIT_USAGE)
    return settings


@click.group("stream")
def stream_group() -> None:
    """Make and inspect the NATS JetStream stream of --buffer nats://."""


@stream_group.command("init")
@_stream_options
def stream_init(**values: Any) -> None:
    """Create or update the stream and the writers' consumer (idempotent); print what was done."""
    from ingest.builder import stream_spec
    from ingest.stream import admin

    def waiting(reason: str) -> None:
        click.echo(f"ingest: {reason}", err=True)

    for line in admin.init(stream_spec(_stream_settings(values)), waiting):
        click.echo(line)


@stream_group.command("status")
@_stream_options
def stream_status(**values: Any) -> None:
    """Requests in the stream, bytes of its bound, what writers hold, its leader and replicas."""
    from ingest.builder import stream_spec
    from ingest.stream import admin

    settings = _stream_settings(values)
    click.echo(admin.status(stream_spec(settings)).format(settings.stream))


@click.command("write")
@settings_options
def write(**values: Any) -> None:
    """Run a writer only: requests from the stream into the database, until SIGINT/SIGTERM.
    Its port (--port) serves /metrics, /healthz and /readyz; POST /messages is refused (404)."""
    from ingest.service import Service, collect_less_often
    from ingest.shutdown import exit_process

    settings = _stream_settings(values)
    if settings.consumers < 1:
        fail("a writer needs --consumers 1 or more", EXIT_USAGE)
    if settings.workers > 1:
        fail("run more writers as more processes (--scale writer=N), not --workers", EXIT_USAGE)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
    )
    collect_less_often()
    service = Service(settings, listens=False)
    service.shutdown.install_signal_handlers()
    service.start()
    exit_process(service.run())
