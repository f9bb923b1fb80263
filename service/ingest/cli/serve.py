"""Running the service and looking at what it runs with: serve, config show, spool status."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from ingest.cli.common import EXIT_FAILURE, SPECS, fail, settings_options
from ingest.config import Settings
from ingest.errors import SpoolError


@click.command("serve")
@settings_options
def serve(**values: Any) -> None:
    """Run the service until SIGINT/SIGTERM, then drain and exit."""
    from ingest.service import Service, collect_less_often
    from ingest.shutdown import exit_process

    settings = Settings.from_mapping(values)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
    )
    if settings.workers > 1:
        from ingest.workers import Workers

        sys.exit(Workers(settings).run())
    collect_less_often()
    service = Service(settings)
    # Before start: a SIGTERM during start-up (a `docker stop` right after `up`) must not be lost,
    # and as PID 1 without a handler it would be. The drain then begins as soon as start returns.
    service.shutdown.install_signal_handlers()
    service.start()
    exit_process(service.run())


@click.group("config")
def config() -> None:
    """Inspect settings."""


@config.command("show")
@settings_options
def config_show(**values: Any) -> None:
    """Print the effective settings (passwords masked) as TOML."""
    for key, value in Settings.from_mapping(values).masked().items():
        if value is None:
            click.echo(f"# {key} is not set")  # TOML has no null
            continue
        rendered = str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) else value
        click.echo(f"{key} = {rendered}".replace("'", '"'))


@click.group("spool")
def spool_group() -> None:
    """Inspect a spool file or directory."""


@spool_group.command("status")
@click.option(SPECS["spool"].flag, "spool_path", envvar=SPECS["spool"].envvar, show_envvar=True, required=True,
              type=click.Path(path_type=Path), help="The spool file or directory of `ingest serve --spool`.")
def spool_status(spool_path: Path) -> None:
    """Messages waiting in a spool and the age of the oldest, without starting the service; for a
    directory, every file, whether a live process owns it, and its messages. Read-only."""
    from ingest.spool import file as spool

    if spool_path.is_dir():
        _directory_status(spool_path)
        return
    try:
        conn = spool.open_spool(spool_path, create=False, writable=False)
    except SpoolError as exc:
        fail(str(exc), EXIT_FAILURE)
    try:
        click.echo(spool.status(conn).format(spool_path))
    finally:
        conn.close()


def _directory_status(path: Path) -> None:
    """One line a file, then the totals; exit 1 if a file cannot be read (it says why)."""
    from ingest.spool import directory

    entries = list(directory.entries(path))
    for entry in entries:
        click.echo(entry.format())
    orphaned = sum(e.status.messages for e in entries if e.status is not None and not e.owned)
    total = sum(e.status.messages for e in entries if e.status is not None)
    click.echo(f"spool    {path}\nfiles    {len(entries)}\nmessages {total}\norphaned {orphaned}")
    bad = [e for e in entries if e.status is None]
    if bad:
        fail(f"spool {path}: {len(bad)} file(s) cannot be read (see above)", EXIT_FAILURE)
