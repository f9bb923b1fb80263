"""The `ingest` command line: serve, write, push, top, db upgrade, stream init, config show, spool status,
dead-letters.

Settings resolve as flag > environment (INGEST_*) > config file (--config, TOML) > default;
click does the resolving, Settings validates. Errors a user can cause end in one line on stderr
and a named exit code, never a traceback: `run` is where that is made so.

One module a command family: serve (the service and its settings), database (admin commands on
the tables), stream (the NATS stream of --buffer nats:// and its writers), tools (HTTP clients of a
running service); common holds what they share.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click

from ingest.cli import database, serve, stream, tools
from ingest.cli.common import EXIT_FAILURE, EXIT_USAGE, fail
from ingest.errors import ConfigError, IngestError

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "entry", "main", "run"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ingest")
def main() -> None:
    """Bursts of pushed messages into SQLite or Postgres, without loss."""


main.add_command(serve.serve)
main.add_command(serve.config)
main.add_command(serve.spool_group)
main.add_command(database.db)
main.add_command(database.dead_letters_group)
main.add_command(database.requests_group)
main.add_command(stream.stream_group)
main.add_command(stream.write)
main.add_command(tools.push)
main.add_command(tools.top)


def run(argv: list[str] | None = None) -> int:
    """Entry point: click in non-standalone mode, so every error becomes one line."""
    try:
        main.main(args=argv, prog_name="ingest", standalone_mode=False)
    except click.exceptions.Abort:
        return EXIT_FAILURE
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.UsageError as exc:
        fail(exc.format_message(), EXIT_USAGE)
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    except IngestError as exc:  # StartupError, ClientError, ...: the message is the interface
        fail(str(exc), EXIT_FAILURE)
    return 0


def entry() -> NoReturn:
    sys.exit(run())
