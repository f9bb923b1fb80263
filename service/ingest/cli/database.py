"""Admin commands on the database, without starting the service: db upgrade, dead-letters, requests purge.

The only command module that imports SQLAlchemy (an import-linter contract says so), so driver
errors become one line here and nowhere else in the CLI.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from ingest.cli.common import EXIT_FAILURE, Decorator, fail, setting_option
from ingest.config import Settings, mask_url
from ingest.db import migrate
from ingest.errors import SchemaNotReady, first_line


def _db_option(help: str) -> Decorator:
    """--db, INGEST_DB_URL and its default as `serve` has them, with what this command does to it."""
    return setting_option("db_url", help=help)


@click.group("db")
def db() -> None:
    """Manage the database schema."""


@db.command("upgrade")
@_db_option("Database to migrate.")
def db_upgrade(db_url: str) -> None:
    """Create or upgrade the tables (Alembic migrations)."""
    db_url = Settings.from_mapping({"db_url": db_url}).db_url
    try:
        before, after = migrate.upgrade_url(db_url)
    except SQLAlchemyError as exc:
        fail(f"cannot migrate {mask_url(db_url)}: {first_line(exc)}", EXIT_FAILURE)
    click.echo(f"{mask_url(db_url)}: {before or 'empty'} -> {after}")


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
        from ingest.db.dead_letters import parse_when

        try:
            return parse_when(str(value), datetime.now(UTC))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@contextmanager
def _database_at_head(db_url: str) -> Iterator[Engine]:
    """An engine on a database at head; a database error or a missing table ends in one line."""
    db_url = Settings.from_mapping({"db_url": db_url}).db_url
    engine = create_engine(db_url)
    try:
        migrate.check_at_head(engine)
        yield engine
    except SchemaNotReady as exc:
        fail(f"{mask_url(db_url)}: {exc}: run `ingest db upgrade`", EXIT_FAILURE)
    except SQLAlchemyError as exc:
        fail(f"cannot use {mask_url(db_url)}: {first_line(exc)}", EXIT_FAILURE)
    finally:
        engine.dispose()


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@click.group("dead-letters")
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
    from ingest.db import dead_letters

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
    from ingest.db import dead_letters

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
        fail(f"replay stopped on {mask_url(db_url)}: {result.stopped}; letters replayed before stay replayed",
              EXIT_FAILURE)
    if result.refused:
        letter_id, error = result.refused[0]
        fail(f"{len(result.refused)} letter(s) refused again, kept with the new error; "
              f"first, id {letter_id}: {error}", EXIT_FAILURE)


@dead_letters_group.command("purge")
@_db_option("Database to purge.")
@click.option("--before", type=When(), required=True, help="Delete letters that failed before TIME.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dead_letters_purge(db_url: str, before: datetime, yes: bool) -> None:
    """Delete letters that failed before TIME. Asks first, unless --yes."""
    from ingest.db import dead_letters

    _purge(db_url, before, yes, "dead letter(s) that failed", dead_letters.count_before, dead_letters.purge)


@click.group("requests")
def requests_group() -> None:
    """Receipts of accepted requests (table requests, read by GET /requests/{id})."""


@requests_group.command("purge")
@_db_option("Database to purge.")
@click.option("--before", type=When(), required=True, help="Delete receipts of requests received before TIME.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def requests_purge(db_url: str, before: datetime, yes: bool) -> None:
    """Delete receipts of requests received before TIME (their ids then answer 404). Asks first,
    unless --yes. Nothing else deletes receipts: one a request, they grow until purged."""
    from ingest.db import receipt_rows

    _purge(db_url, before, yes, "receipt(s) of requests received", receipt_rows.count_before, receipt_rows.purge)


def _purge(
    db_url: str, before: datetime, yes: bool, what: str,
    count: Callable[[Engine, datetime], int], purge: Callable[[Engine, datetime], int],
) -> None:
    with _database_at_head(db_url) as engine:
        if not yes:
            found = count(engine, before)
            if found and not _confirmed(f"purge {found} {what} before {_stamp(before)}?"):
                fail("purge declined: nothing deleted (--yes purges without asking)", EXIT_FAILURE)
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


