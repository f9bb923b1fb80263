"""What every command module shares: exit codes, the one-line failure, and Settings as click options.

The options are generated from the Settings fields (config.setting_specs), so a flag, its env var,
default and help are written once, next to the field they fill.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from ingest.config import SettingSpec, load_config_file, setting_specs

EXIT_FAILURE = 1
EXIT_USAGE = 2

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

SPECS: dict[str, SettingSpec] = {spec.name: spec for spec in setting_specs()}


def fail(message: str, code: int) -> NoReturn:
    """The way a command ends on an error a user can cause: one line on stderr, a named exit code."""
    click.echo(f"ingest: error: {message}", err=True)
    sys.exit(code)


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Eager: the file's values become click's default_map, below env vars and flags."""
    if value:
        ctx.default_map = {**(ctx.default_map or {}), **load_config_file(Path(value))}
    return value


def setting_option(name: str, **overrides: Any) -> Decorator:
    """The click option of one Settings field; `overrides` (a command's own help, say) win."""
    spec = SPECS[name]
    kwargs: dict[str, Any] = {
        "envvar": spec.envvar, "show_envvar": True, "show_default": True, "default": spec.default,
        "type": None if spec.type is bool else spec.type, "help": spec.help,
    }
    return click.option(spec.flag, spec.name, **{**kwargs, **overrides})


_CONFIG_OPTION: Decorator = click.option(
    "--config", "config_file", envvar="INGEST_CONFIG", show_envvar=True, is_eager=True, expose_value=False,
    callback=_load_config, type=click.Path(dir_okay=False),
    help="TOML file of settings (see config/ingest.example.toml).",
)


def settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--config, then every Settings field in field order: the options of serve and config show."""
    options: list[Decorator] = [_CONFIG_OPTION, *(setting_option(name) for name in SPECS)]
    for option in reversed(options):
        command = option(command)
    return command
