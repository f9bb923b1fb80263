"""Precedence (default < file < env < flag) and one-line errors with exit code 2."""

import socket
import subprocess
import sys

import pytest

from ingest.cli import run


def show(capsys, *args: str) -> dict[str, str]:
    assert run(["config", "show", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    return dict(line.split(" = ", 1) for line in lines if not line.startswith("#"))


def fail(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        run(list(args))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_defaults(capsys) -> None:
    shown = show(capsys)
    assert shown["queue_size"] == "10000" and shown["consumers"] == "4" and shown["ack"] == '"enqueue"'
    assert shown["db_url"] == '"sqlite:///ingest.db"' and shown["batch_linger_s"] == "0.05"


def test_file_then_env_then_flag(capsys, tmp_path, monkeypatch) -> None:
    config = tmp_path / "ingest.toml"
    config.write_text('queue_size = 111\nconsumers = 7\nbatch_size = 50\nack = "commit"\n')
    assert show(capsys, "--config", str(config))["queue_size"] == "111"
    monkeypatch.setenv("INGEST_QUEUE_SIZE", "222")
    monkeypatch.setenv("INGEST_CONSUMERS", "3")
    shown = show(capsys, "--config", str(config), "--queue-size", "333")
    assert shown["queue_size"] == "333"  # flag beats env and file
    assert shown["consumers"] == "3"  # env beats file
    assert shown["batch_size"] == "50" and shown["ack"] == '"commit"'  # file beats default
    monkeypatch.setenv("INGEST_CONFIG", str(config))
    monkeypatch.delenv("INGEST_QUEUE_SIZE")
    assert show(capsys)["queue_size"] == "111"


def test_password_is_masked(capsys, monkeypatch) -> None:
    monkeypatch.setenv("INGEST_DB_URL", "postgresql+psycopg://app:s3cret@db.example/ingest")
    shown = show(capsys)
    assert shown["db_url"] == '"postgresql+psycopg://app:***@db.example/ingest"'


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--queue-size", "-5"], "queue_size must be at least 1, got -5"),
        (["--consumers", "0"], "consumers must be at least 1"),
        (["--batch-linger", "-1"], "batch_linger_s must not be negative"),
        (["--pin-workers"], "give --workers 2 or more with it"),
        (["--ack", "later"], "ack must be one of enqueue, commit, got 'later'"),
        (["--event-loop", "trio"], "event_loop must be one of uvloop, asyncio, got 'trio'"),
        (["--db", "mysql://u@h/db"], "db_url scheme 'mysql' is not supported"),
        (["--db", "postgresql+asyncpg://u@h/db"], "is not supported"),
        (["--db", "not a url"], "db_url is not a database URL"),
        (["--db", "sqlite://"], "in-memory SQLite is not supported"),
        (["--db", "sqlite:///:memory:"], "in-memory SQLite is not supported"),
        (["--port", "70000"], "port must be between 0 and 65535"),
        (["--port", "eighty"], "'eighty' is not a valid integer"),
        (["--config", "/nonexistent/ingest.toml"], "config file /nonexistent/ingest.toml does not exist"),
    ],
)
def test_bad_values_exit_2_with_one_line(capsys, args, message) -> None:
    err = fail(capsys, "serve", *args)
    assert err.startswith("ingest: error: ") and message in err


def test_bad_config_files(capsys, tmp_path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("queue_size = \n")
    assert "is not valid TOML" in fail(capsys, "config", "show", "--config", str(config))
    config.write_text("queue_sise = 5\n")
    assert "unknown setting(s): queue_sise" in fail(capsys, "config", "show", "--config", str(config))
    config.write_text('queue_size = "big"\n')
    assert "'big' is not a valid integer" in fail(capsys, "config", "show", "--config", str(config))


def test_example_config_file_is_valid_and_documents_every_setting(capsys) -> None:
    from dataclasses import fields
    from pathlib import Path

    from ingest.config import Settings

    example = Path(__file__).parent.parent / "config" / "ingest.example.toml"
    text = example.read_text()
    for field in fields(Settings):
        assert f"\n{field.name} = " in text or f"\n# {field.name} = " in text, field.name
    assert show(capsys, "--config", str(example))["queue_size"] == "10000"


def test_unknown_command_and_option_are_one_line(capsys) -> None:
    assert "No such command" in fail(capsys, "serv")
    assert "No such option" in fail(capsys, "serve", "--queue", "3")


def test_unreachable_database_is_one_line_exit_1() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ingest", "serve", "--port", "0", "--db", "postgresql+psycopg://postgres@127.0.0.1:1/none"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    last = done.stderr.splitlines()[-1]
    assert last.startswith("ingest: error: cannot migrate the database: ") and "Connection refused" in last
    assert "Traceback" not in done.stderr


def test_port_in_use_is_one_line_exit_1(sqlite_url) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "ingest", "serve", "--port", str(port), "--db", sqlite_url],
            capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == f"ingest: error: cannot listen on 127.0.0.1:{port}: address already in use"
    assert "Traceback" not in done.stderr


def test_plain_postgresql_urls_mean_psycopg(capsys) -> None:
    assert show(capsys, "--db", "postgresql://app@db/x")["db_url"] == '"postgresql+psycopg://app@db/x"'
    assert show(capsys, "--db", "postgres://app@db/x")["db_url"] == '"postgresql+psycopg://app@db/x"'
