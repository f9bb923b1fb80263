"""The `ingest` command line: serve, push, top, db upgrade, config show, spool status, dead-letters.

Settings resolve as flag > environment (INGEST_*) > config file (--config, TOML) > default;
click does the resolving, Settings validates. Errors a user can cause end in one line on stderr
and a named exit code, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from ingest import migrate
from ingest.config import Settings, SettingSpec, load_config_file, mask_url, setting_specs
from ingest.errors import ConfigError, IngestError, SpoolError

EXIT_FAILURE = 1
EXIT_USAGE = 2

_DEFAULTS = Settings()


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Eager: the file's values become click's default_map, below env vars and flags."""
    if value:
        ctx.default_map = {**(ctx.default_map or {}), **load_config_file(Path(value))}
    return value


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _settings_option(spec: SettingSpec) -> Decorator:
    """One Settings field as a click option; the field's metadata is all it takes."""
    return click.option(spec.flag, spec.name, envvar=spec.envvar, show_envvar=True, show_default=True,
                        type=None if spec.type is bool else spec.type, default=spec.default, help=spec.help)


SETTINGS_OPTIONS: list[Decorator] = [
    click.option("--config", "config_file", envvar="INGEST_CONFIG", show_envvar=True, is_eager=True,
                 expose_value=False, callback=_load_config, type=click.Path(dir_okay=False),
                 help="TOML file of settings (see config/ingest.example.toml)."),
    *(_settings_option(spec) for spec in setting_specs()),
]


def settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(SETTINGS_OPTIONS):
        command = option(command)
    return command


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"ingest: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ingest")
def main() -> None:
    """Bursts of pushed messages into SQLite or Postgres, without loss."""


@main.command()
@settings_options
def serve(**values: Any) -> None:
    """Run the service until SIGINT/SIGTERM, then drain and exit."""
    from ingest.service import Service
    from ingest.shutdown import exit_process

    settings = Settings.from_mapping(values)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
    )
    if settings.workers > 1:
        from ingest.workers import Workers

        sys.exit(Workers(settings).run())
    service = Service(settings)
    # Before start: a SIGTERM during start-up (a `docker stop` right after `up`) must not be lost,
    # and as PID 1 without a handler it would be. The drain then begins as soon as start returns.
    service.shutdown.install_signal_handlers()
    service.start()
    exit_process(service.run())


@main.group()
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


@main.group()
def db() -> None:
    """Manage the database schema."""


@db.command("upgrade")
@click.option("--db", "db_url", envvar="INGEST_DB_URL", show_envvar=True, default=_DEFAULTS.db_url,
              show_default=True, help="Database to migrate.")
def db_upgrade(db_url: str) -> None:
    """Create or upgrade the tables (Alembic migrations)."""
    db_url = Settings.from_mapping({"db_url": db_url}).db_url
    try:
        before, after = migrate.upgrade_url(db_url)
    except SQLAlchemyError as exc:
        _fail(f"cannot migrate {mask_url(db_url)}: {str(getattr(exc, 'orig', exc)).splitlines()[0]}", EXIT_FAILURE)
    click.echo(f"{mask_url(db_url)}: {before or 'empty'} -> {after}")


@main.group("spool")
def spool_group() -> None:
    """Inspect a spool file."""


@spool_group.command("status")
@click.option("--spool", "spool_path", envvar="INGEST_SPOOL", show_envvar=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The spool file of `ingest serve --spool`.")
def spool_status(spool_path: Path) -> None:
    """Messages waiting in a spool and the age of the oldest, without starting the service."""
    from ingest import spool

    try:
        conn = spool.open_spool(spool_path, create=False, writable=False)
    except SpoolError as exc:
        _fail(str(exc), EXIT_FAILURE)
    try:
        click.echo(spool.status(conn).format(spool_path))
    finally:
        conn.close()


# click made ParamType generic only recently; pyproject allows click 8.1, where it is not.
if TYPE_CHECKING:
    _DateTimeParam = click.ParamType[datetime]
else:
    _DateTimeParam = click.ParamType


class When(_DateTimeParam):
    """A moment: an ISO 8601 date or datetime (naive = UTC), or a duration ago (30s, 15m, 2h, 7d)."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        from ingest.dead_letters import parse_when

        try:
            return parse_when(str(value), datetime.now(UTC))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _db_option(help: str) -> Decorator:
    return click.option("--db", "db_url", envvar="INGEST_DB_URL", show_envvar=True, default=_DEFAULTS.db_url,
                        show_default=True, help=help)


@contextmanager
def _database_at_head(db_url: str) -> Iterator[Engine]:
    """An engine on a database at head; a database error or a missing table ends in one line."""
    from ingest.dead_letters import SchemaNotReady, check_schema
    from ingest.store import first_line

    db_url = Settings.from_mapping({"db_url": db_url}).db_url
    engine = create_engine(db_url)
    try:
        check_schema(engine)
        yield engine
    except SchemaNotReady as exc:
        _fail(f"{mask_url(db_url)}: {exc}", EXIT_FAILURE)
    except SQLAlchemyError as exc:
        _fail(f"cannot use {mask_url(db_url)}: {first_line(exc)}", EXIT_FAILURE)
    finally:
        engine.dispose()


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@main.group("dead-letters")
def dead_letters_group() -> None:
    """Messages the database refused (table dead_letters): list, replay, purge.

    TIME is an ISO 8601 date or datetime (naive = UTC), e.g. 2026-11-27 or 2026-11-27T08:00:00Z,
    or a duration ago: 30s, 15m, 2h, 7d.
    """


@dead_letters_group.command("list")
@_db_option("Database to read.")
@click.option("--since", type=When(), default=None, help="Only letters that failed at or after TIME.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="Most letters to show, oldest first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line (NDJSON), every column in full.")
def dead_letters_list(db_url: str, since: datetime | None, limit: int, as_json: bool) -> None:
    """Show what was refused, when and why. Oldest first (by failed_at), the first --limit letters."""
    from ingest import dead_letters

    with _database_at_head(db_url) as engine:
        page = dead_letters.list_letters(engine, since=since, limit=limit)
    if not as_json:
        for line in page.table():
            click.echo(line)
        return
    for letter in page.letters:
        click.echo(json.dumps(letter.as_json(), ensure_ascii=False))
    if page.more:  # stdout stays pure NDJSON
        click.echo(f"... and {page.more} more; use --limit", err=True)


@dead_letters_group.command("replay")
@_db_option("Database to replay in.")
@click.option("--id", "ids", type=int, multiple=True, help="A letter to replay (repeatable).")
@click.option("--since", type=When(), default=None, help="Every letter that failed at or after TIME.")
@click.option("--all", "everything", is_flag=True, help="Every letter.")
def dead_letters_replay(db_url: str, ids: tuple[int, ...], since: datetime | None, everything: bool) -> None:
    """Re-submit letters to messages, once the cause is fixed. One transaction a letter.

    A letter whose identity is stored already just leaves; one the database refuses again stays,
    with the new error. Exit 0 when none was refused again, 1 when some was.
    """
    from ingest import dead_letters

    if sum((bool(ids), since is not None, everything)) != 1:
        raise click.UsageError("give exactly one of --id N (repeatable), --since TIME or --all")
    with _database_at_head(db_url) as engine:
        chosen = list(dict.fromkeys(ids)) if ids else dead_letters.select_ids(engine, since=since)
        result = dead_letters.replay(engine, chosen)
    summary = (f"replayed {result.replayed}: stored {result.stored}, already stored {result.already_stored}, "
               f"refused again {len(result.refused)}")
    if result.not_found:
        summary += f"; not found: {', '.join(map(str, result.not_found))}"
    click.echo(summary)
    if result.stopped is not None:
        _fail(f"replay stopped on {mask_url(db_url)}: {result.stopped}; letters replayed before stay replayed",
              EXIT_FAILURE)
    if result.refused:
        letter_id, error = result.refused[0]
        _fail(f"{len(result.refused)} letter(s) refused again, kept with the new error; "
              f"first, id {letter_id}: {error}", EXIT_FAILURE)


@dead_letters_group.command("purge")
@_db_option("Database to purge.")
@click.option("--before", type=When(), required=True, help="Delete letters that failed before TIME.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dead_letters_purge(db_url: str, before: datetime, yes: bool) -> None:
    """Delete letters that failed before TIME. Asks first, unless --yes."""
    from ingest import dead_letters

    _purge(db_url, before, yes, "dead letter(s) that failed", dead_letters.count_before, dead_letters.purge)


@main.group("requests")
def requests_group() -> None:
    """Receipts of accepted requests (table requests, read by GET /requests/{id})."""


@requests_group.command("purge")
@_db_option("Database to purge.")
@click.option("--before", type=When(), required=True, help="Delete receipts of requests received before TIME.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def requests_purge(db_url: str, before: datetime, yes: bool) -> None:
    """Delete receipts of requests received before TIME (their ids then answer 404). Asks first,
    unless --yes. Nothing else deletes receipts: one a request, they grow until purged."""
    from ingest import receipt_rows

    _purge(db_url, before, yes, "receipt(s) of requests received", receipt_rows.count_before, receipt_rows.purge)


def _purge(
    db_url: str, before: datetime, yes: bool, what: str,
    count: Callable[[Engine, datetime], int], purge: Callable[[Engine, datetime], int],
) -> None:
    with _database_at_head(db_url) as engine:
        if not yes:
            found = count(engine, before)
            if found and not _confirmed(f"purge {found} {what} before {_stamp(before)}?"):
                _fail("purge declined: nothing deleted (--yes purges without asking)", EXIT_FAILURE)
        purged = purge(engine, before)
    click.echo(f"purged {purged} {what} before {_stamp(before)}")


def _confirmed(question: str) -> bool:
    """click.confirm, where end of input (a non-interactive stdin) counts as no."""
    try:
        answer = click.confirm(question, default=False, err=True)
    except click.exceptions.Abort:
        answer = False
    if not sys.stdin.isatty():
        click.echo(err=True)  # no terminal echoed a newline after the prompt
    return answer


@main.command()
@click.option("--url", default="http://127.0.0.1:8080", show_default=True, help="Service to push to.")
@click.option("--count", type=int, default=10_000, show_default=True, help="Messages to send.")
@click.option("--batch", type=int, default=100, show_default=True, help="Messages a request (NDJSON when > 1).")
@click.option("--concurrency", type=int, default=16, show_default=True, help="Requests in flight.")
@click.option("--rate", type=float, default=None, help="Messages a second (default: as fast as possible).")
@click.option("--burst", type=int, default=0, show_default=True, help="Extra messages sent at once each second.")
@click.option("--ack", type=click.Choice(["enqueue", "commit"]), default="enqueue", show_default=True)
@click.option("--gzip/--no-gzip", "gzip", default=False, help="Compress request bodies.")
@click.option("--token", envvar="INGEST_TOKEN", show_envvar=True, default=None,
              help="Bearer token, for a service started with --auth-tokens.")
@click.option("--cacert", default=None, help="A CA file to trust for an https:// URL (default: the system's).")
@click.option("--idempotent/--no-idempotent", "idempotent", default=False,
              help="Send an Idempotency-Key with every request, so that no retry stores a message twice; "
                   "requests that time out are then retried too.")
@click.option("--receipts", is_flag=True,
              help="At the end, ask GET /requests/{id} for a sample of 100 requests until they are stored "
                   "(up to --receipt-timeout); exit 1 unless all are.")
@click.option("--receipt-timeout", "receipt_timeout_s", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, help="Seconds --receipts waits for pending messages.")
def push(**values: Any) -> None:
    """Push generated messages at a running service; exit 1 if any was not acknowledged."""
    from ingest import push as pusher
    from ingest.report import progress_bar

    options = pusher.PushOptions(**values)
    progress = progress_bar(sys.stderr) if sys.stderr.isatty() else None
    try:
        summary = pusher.run(options, progress=progress)
    finally:
        if progress is not None:
            progress.close()  # end the bar's line even when the run failed
    click.echo(summary.format())
    if not summary.ok:
        sys.exit(EXIT_FAILURE)


@main.command()
@click.option("--url", default="http://127.0.0.1:8080", show_default=True, help="Service to watch.")
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--token", envvar="INGEST_METRICS_TOKEN", show_envvar=True, default=None,
              help="Bearer token for /metrics, for a service started with --metrics-token.")
@click.option("--cacert", default=None, help="A CA file to trust for an https:// URL (default: the system's).")
def top(url: str, once: bool, interval_s: float, token: str | None, cacert: str | None) -> None:
    """A live view of a running service, read from its /metrics."""
    from ingest import top as viewer

    sys.exit(viewer.run(url=url, once=once, interval_s=interval_s, out=sys.stdout, token=token, cacert=cacert))


def run(argv: list[str] | None = None) -> int:
    """Entry point: click in non-standalone mode, so every error becomes one line."""
    try:
        main.main(args=argv, prog_name="ingest", standalone_mode=False)
    except click.exceptions.Abort:
        return EXIT_FAILURE
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.UsageError as exc:
        _fail(exc.format_message(), EXIT_USAGE)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    except IngestError as exc:  # StartupError, ClientError, ...: the message is the interface
        _fail(str(exc), EXIT_FAILURE)
    return 0


def entry() -> NoReturn:
    sys.exit(run())
