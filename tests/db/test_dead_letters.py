"""`ingest dead-letters list|replay|purge` on real SQLite and Postgres databases.

Letters come from a real refusal where practical: a CHECK constraint (Postgres) or a trigger
(SQLite) refuses messages with a "bad" field, the Store dead-letters them, and dropping the
constraint is the fix a replay waits for. Other tests insert letters with Core to set exact times,
identities and requests.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, func, insert, select, text
from sqlalchemy.engine import Engine

from ingest.cli import run
from ingest.db import dead_letters, migrate
from ingest.db.pool import ConnectionPool
from ingest.db.store import Store
from ingest.db.tables import dead_letters as letters_table
from ingest.db.tables import messages, requests
from ingest.messages import Message
from ingest.metrics import Metrics
from support.stages import refuse_bad
from support.tcpproxy import TcpProxy

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


@pytest.fixture
def engine(db_url, make_engine) -> Engine:
    """A database at head."""
    engine = make_engine(db_url)
    migrate.upgrade(engine)
    return engine


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `ingest dead-letters ARGS`; (exit code, stdout, stderr)."""
    try:
        code = run(["dead-letters", *args])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def one_line_error(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("ingest: error: "), err
    return err.strip()


def allow_bad(engine: Engine) -> None:
    """The fix: undoes stages.refuse_bad."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("ALTER TABLE messages DROP CONSTRAINT refuse_bad")
        else:
            conn.exec_driver_sql("DROP TRIGGER refuse_bad")


def add_letter(
    engine: Engine,
    payload: str,
    *,
    failed_at: datetime = T0,
    ident: str | None = None,
    request: str | None = None,
    client: str | None = None,
    error: str = "IntegrityError: refused",
) -> int:
    row = {
        "received_at": failed_at - timedelta(seconds=1),
        "failed_at": failed_at,
        "payload": payload,
        "error": error,
        "ident": ident,
        "request": request,
        "client": client,
    }
    with engine.begin() as conn:
        return int(conn.execute(insert(letters_table).values(row).returning(letters_table.c.id)).scalar_one())


def add_receipt(engine: Engine, request_id: str, *, accepted: int, stored: int, dead_lettered: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(requests).values(
                id=request_id, accepted=accepted, stored=stored, dead_lettered=dead_lettered, received_at=T0
            )
        )


def receipt(engine: Engine, request_id: str) -> tuple[int, int]:
    with engine.connect() as conn:
        row = conn.execute(select(requests.c.stored, requests.c.dead_lettered).where(requests.c.id == request_id)).one()
    return row.stored, row.dead_lettered


def count(engine: Engine, table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def stored_payloads(engine: Engine) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(select(messages.c.payload).order_by(messages.c.id)).scalars().all()
    return [json.loads(p) if isinstance(p, str) else p for p in rows]


def letter_errors(engine: Engine) -> dict[int, str]:
    with engine.connect() as conn:
        return dict(conn.execute(select(letters_table.c.id, letters_table.c.error)).all())


# --- list ---------------------------------------------------------------------------------------


def test_list_oldest_first_as_a_table_and_as_ndjson(engine, db_url, capsys) -> None:
    long_payload = json.dumps({"text": "x" * 200, "bad": True})
    late = add_letter(engine, '{"n": 2}', failed_at=T0 + timedelta(hours=2), request="req-b", client="alice")
    early = add_letter(
        engine,
        long_payload,
        failed_at=T0,
        ident="f:1",
        request="req-a",
        error="IntegrityError: CHECK constraint failed: " + "y" * 100,
    )
    middle = add_letter(engine, '{"n":\n 1}', failed_at=T0 + timedelta(hours=1))

    code, out, _ = cli(capsys, "list", "--db", db_url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["id", "failed_at", "(UTC)", "request", "client", "error", "payload"]
    assert [int(line.split()[0]) for line in lines[1:4]] == [early, middle, late]
    assert "2026-11-20 08:00:00  req-a" in lines[1] and lines[1].endswith("...")
    assert "-" in lines[2].split() and '{"n": 1}' in lines[2]  # no request; the payload's newline folded
    assert "req-b             alice" in lines[3]
    assert lines[4] == "3 dead letter(s)"
    assert max(len(line) for line in lines) < 160  # shortened, not the full 200-character payload

    code, out, err = cli(capsys, "list", "--db", db_url, "--json")
    assert code == 0 and err == ""
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == [early, middle, late]
    assert rows[0] == {
        "id": early,
        "received_at": "2026-11-20T07:59:59+00:00",
        "failed_at": "2026-11-20T08:00:00+00:00",
        "payload": long_payload,
        "error": "IntegrityError: CHECK constraint failed: " + "y" * 100,
        "ident": "f:1",
        "request": "req-a",
        "client": None,
    }
    assert rows[1]["payload"] == '{"n":\n 1}' and rows[1]["request"] is None
    assert rows[2]["client"] == "alice"


def test_list_since_and_limit_say_how_many_more(engine, db_url, capsys) -> None:
    now = datetime.now(UTC)
    for hours in (50, 3, 2, 1):
        add_letter(engine, json.dumps({"hours_ago": hours}), failed_at=now - timedelta(hours=hours))

    code, out, _ = cli(capsys, "list", "--db", db_url, "--since", "150m")
    assert code == 0 and out.splitlines()[-1] == "2 dead letter(s)"
    iso = (now - timedelta(hours=4)).replace(tzinfo=None).isoformat()  # naive means UTC
    assert cli(capsys, "list", "--db", db_url, "--since", iso)[1].splitlines()[-1] == "3 dead letter(s)"
    day = (now - timedelta(days=3)).date().isoformat()
    assert cli(capsys, "list", "--db", db_url, "--since", day)[1].splitlines()[-1] == "4 dead letter(s)"

    code, out, _ = cli(capsys, "list", "--db", db_url, "--limit", "1")
    assert code == 0
    assert '{"hours_ago": 50}' in out.splitlines()[1]  # oldest first
    assert out.splitlines()[-1] == "1 dead letter(s) ... and 3 more; use --limit"

    code, out, err = cli(capsys, "list", "--db", db_url, "--since", "181m", "--limit", "1", "--json")
    assert code == 0
    assert [json.loads(line)["payload"] for line in out.splitlines()] == ['{"hours_ago": 3}']
    assert err == "... and 2 more; use --limit\n"  # stdout stays pure NDJSON


def test_list_of_no_letters(engine, db_url, capsys) -> None:
    assert cli(capsys, "list", "--db", db_url) == (0, "0 dead letter(s)\n", "")
    assert cli(capsys, "list", "--db", db_url, "--json") == (0, "", "")


# --- replay -------------------------------------------------------------------------------------


def test_letters_the_store_made_replay_once_the_cause_is_fixed(engine, db_url, capsys) -> None:
    refuse_bad(engine)
    pool = ConnectionPool(db_url, size=1)
    try:
        store = Store(pool, Metrics(["consumer-1"]), threading.Event())
        batch = [
            Message(json.dumps(body), T0.timestamp(), ident=None)
            for body in ({"n": 0}, {"n": 1, "bad": "a"}, {"n": 2}, {"n": 3, "bad": "b"})
        ]
        result = store.write(batch)
    finally:
        pool.dispose()
    assert len(result.stored) == 2 and len(result.dead) == 2
    assert count(engine, letters_table) == 2

    # Still refused: the letters stay, exit 1, the error names the refusal.
    code, out, err = cli(capsys, "replay", "--db", db_url, "--all")
    assert code == 1
    assert out == "replayed 2: stored 0, already stored 0, refused again 2\n"
    assert "2 letter(s) refused again, kept with the new error; first, id " in one_line_error(err)
    assert count(engine, letters_table) == 2 and count(engine, messages) == 2

    allow_bad(engine)
    code, out, err = cli(capsys, "replay", "--db", db_url, "--all")
    assert (code, out, err) == (0, "replayed 2: stored 2, already stored 0, refused again 0\n", "")
    assert sorted(p["n"] for p in stored_payloads(engine)) == [0, 1, 2, 3]
    assert {"n": 1, "bad": "a"} in stored_payloads(engine)
    assert count(engine, letters_table) == 0

    # Twice is the same as once: nothing left, nothing stored twice.
    assert cli(capsys, "replay", "--db", db_url, "--all")[:2] == (
        0,
        "replayed 0: stored 0, already stored 0, refused again 0\n",
    )
    assert count(engine, messages) == 4


def test_replay_moves_the_receipt_and_keeps_the_message_as_received(engine, db_url, capsys) -> None:
    add_receipt(engine, "req-1", accepted=4, stored=2, dead_lettered=2)
    first = add_letter(engine, '{"k": "a",  "v": [1, 2]}', ident="f:a", request="req-1")
    second = add_letter(engine, '{"k": "b"}', ident="f:b", request="req-1", failed_at=T0 + timedelta(minutes=1))

    code, out, _ = cli(capsys, "replay", "--db", db_url, "--id", str(first), "--id", str(second))
    assert (code, out) == (0, "replayed 2: stored 2, already stored 0, refused again 0\n")
    assert receipt(engine, "req-1") == (4, 0)
    assert count(engine, letters_table) == 0
    with engine.connect() as conn:
        rows = conn.execute(select(messages).order_by(messages.c.id)).all()
    assert [r.ident for r in rows] == ["f:a", "f:b"]
    assert dead_letters.utc(rows[0].received_at) == T0 - timedelta(seconds=1)
    if engine.dialect.name == "sqlite":
        # The text as received, byte for byte; on Postgres JSONB normalises it.
        with engine.connect() as conn:
            assert conn.execute(text("SELECT payload FROM messages WHERE ident = 'f:a'")).scalar_one() == (
                '{"k": "a",  "v": [1, 2]}'
            )
    assert stored_payloads(engine)[0] == {"k": "a", "v": [1, 2]}

    # Run again by id: the letters are gone, which is not an error.
    code, out, _ = cli(capsys, "replay", "--db", db_url, "--id", str(first))
    assert (code, out) == (0, f"replayed 0: stored 0, already stored 0, refused again 0; not found: {first}\n")
    assert count(engine, messages) == 2 and receipt(engine, "req-1") == (4, 0)


def test_receipt_counts_stay_within_bounds(engine, db_url, capsys) -> None:
    add_receipt(engine, "req-odd", accepted=1, stored=1, dead_lettered=0)  # already says all stored
    add_letter(engine, '{"odd": true}', request="req-odd")
    assert cli(capsys, "replay", "--db", db_url, "--all")[0] == 0
    assert receipt(engine, "req-odd") == (1, 0)


def test_letter_whose_identity_is_stored_leaves_as_already_stored(engine, db_url, capsys) -> None:
    with engine.begin() as conn:
        conn.execute(insert(messages).values(received_at=T0, payload={"first": True}, ident="k:key:0"))
    add_receipt(engine, "req-2", accepted=1, stored=0, dead_lettered=1)
    add_letter(engine, '{"first": false}', ident="k:key:0", request="req-2")

    code, out, _ = cli(capsys, "replay", "--db", db_url, "--since", "2026-11-01")
    assert (code, out) == (0, "replayed 1: stored 0, already stored 1, refused again 0\n")
    assert stored_payloads(engine) == [{"first": True}]
    assert count(engine, letters_table) == 0
    assert receipt(engine, "req-2") == (1, 0)


def test_refused_again_keeps_the_letter_with_the_new_error(engine, db_url, capsys) -> None:
    refuse_bad(engine)
    add_receipt(engine, "req-3", accepted=2, stored=1, dead_lettered=1)
    refused = add_letter(engine, '{"bad": 1}', ident="f:bad", request="req-3", error="old error")
    fine = add_letter(engine, '{"good": 1}', ident="f:good", request="req-3", error="old error")

    code, out, err = cli(capsys, "replay", "--db", db_url, "--all")
    assert code == 1
    assert out == "replayed 2: stored 1, already stored 0, refused again 1\n"
    line = one_line_error(err)
    assert f"1 letter(s) refused again, kept with the new error; first, id {refused}: " in line
    errors = letter_errors(engine)
    assert list(errors) == [refused]  # the other one was stored
    expected = "CheckViolation: " if engine.dialect.name == "postgresql" else "IntegrityError: bad refused"
    assert errors[refused].startswith(expected) and errors[refused] in line
    assert receipt(engine, "req-3") == (2, 0)  # the stored one moved; the refused one did not
    assert fine not in errors


def test_two_replays_at_once_never_store_a_letter_twice(postgres_url, make_engine) -> None:
    """Delete first: the second replay finds the row gone, even without identities to conflict on."""
    engine = make_engine(postgres_url)
    migrate.upgrade(engine)
    ids = [add_letter(engine, json.dumps({"n": n})) for n in range(60)]
    barrier = threading.Barrier(2)
    results: list[dead_letters.ReplayResult] = []

    def replay(order: list[int]) -> None:
        barrier.wait(10)
        results.append(dead_letters.replay(engine, order))

    threads = [threading.Thread(target=replay, args=(order,)) for order in (ids, ids[::-1])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 2
    first, second = results
    assert first.stored + second.stored == 60
    # Each letter was taken by exactly one of them; the other found it gone.
    assert not set(first.not_found) & set(second.not_found)
    assert set(first.not_found) | set(second.not_found) == set(ids)
    assert count(engine, messages) == 60 and count(engine, letters_table) == 0


def test_a_lost_connection_stops_the_replay_and_keeps_what_was_done(postgres_url, make_engine, capsys) -> None:
    engine = make_engine(postgres_url)
    migrate.upgrade(engine)
    ids = [add_letter(engine, json.dumps({"n": n})) for n in range(3)]
    host_port = postgres_url.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.split(":")
    proxy = TcpProxy(host, int(port))
    try:
        proxied = make_engine(postgres_url.replace(host_port, f"127.0.0.1:{proxy.port}"))
        begins = []

        def cut_before_the_second_letter(_conn) -> None:
            begins.append(1)
            if len(begins) == 2:
                proxy.cut()

        event.listen(proxied, "begin", cut_before_the_second_letter)
        result = dead_letters.replay(proxied, ids)
    finally:
        proxy.close()
    assert result.stored == 1 and result.refused == [] and result.not_found == []
    assert result.stopped is not None and result.stopped.startswith("OperationalError: ")
    assert count(engine, messages) == 1 and sorted(letter_errors(engine)) == ids[1:]

    # Once the database is back, the rest replays; the first is not stored twice.
    assert cli(capsys, "replay", "--db", postgres_url, "--all")[:2] == (
        0,
        "replayed 2: stored 2, already stored 0, refused again 0\n",
    )
    assert sorted(p["n"] for p in stored_payloads(engine)) == [0, 1, 2]


def test_replay_needs_exactly_one_selector(engine, db_url, capsys) -> None:
    for args in ([], ["--all", "--id", "1"], ["--since", "1h", "--all"]):
        code, _, err = cli(capsys, "replay", "--db", db_url, *args)
        assert code == 2
        assert one_line_error(err) == "ingest: error: give exactly one of --id N (repeatable), --since TIME or --all"


# --- purge --------------------------------------------------------------------------------------


def test_purge_with_yes_deletes_only_older_letters(engine, db_url, capsys) -> None:
    add_letter(engine, '{"old": 1}', failed_at=T0 - timedelta(days=10))
    add_letter(engine, '{"old": 2}', failed_at=T0 - timedelta(days=1))
    kept = add_letter(engine, '{"new": 1}', failed_at=T0)

    code, out, err = cli(capsys, "purge", "--db", db_url, "--before", "2026-11-20T07:00:00Z", "--yes")
    assert (code, out, err) == (0, "purged 2 dead letter(s) that failed before 2026-11-20T07:00:00Z\n", "")
    assert list(letter_errors(engine)) == [kept]
    assert cli(capsys, "purge", "--db", db_url, "--before", "2026-11-20 10:00+02:00", "--yes")[1] == (
        "purged 0 dead letter(s) that failed before 2026-11-20T08:00:00Z\n"  # < T, not <=
    )


def test_purge_asks_and_a_no_deletes_nothing(engine, db_url, capsys, monkeypatch) -> None:
    add_letter(engine, '{"old": 1}')
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    code, out, err = cli(capsys, "purge", "--db", db_url, "--before", "1d")
    assert code == 1 and out == ""
    question, error = err.splitlines()
    assert question.startswith("purge 1 dead letter(s) that failed before ") and question.endswith("? [y/N]: ")
    assert error == "ingest: error: purge declined: nothing deleted (--yes purges without asking)"
    assert count(engine, letters_table) == 1

    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    code, out, _ = cli(capsys, "purge", "--db", db_url, "--before", "1d")
    assert code == 0 and out.startswith("purged 1 dead letter(s) that failed before ")
    assert count(engine, letters_table) == 0


def test_purge_without_a_terminal_or_yes_declines_at_once(sqlite_url, make_engine) -> None:
    engine = make_engine(sqlite_url)
    migrate.upgrade(engine)
    add_letter(engine, '{"old": 1}')
    done = subprocess.run(
        [sys.executable, "-m", "ingest", "dead-letters", "purge", "--db", sqlite_url, "--before", "1d"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert (
        done.stderr.splitlines()[-1] == "ingest: error: purge declined: nothing deleted (--yes purges without asking)"
    )
    assert "Traceback" not in done.stderr
    assert count(engine, letters_table) == 1


# --- errors a user can cause --------------------------------------------------------------------


@pytest.mark.parametrize("command", [["list", "--since"], ["replay", "--since"], ["purge", "--yes", "--before"]])
@pytest.mark.parametrize("bad", ["yesterday", "7w", "-1d", "2026-13-01", ""])
def test_a_bad_time_is_a_usage_error(sqlite_url, capsys, command, bad) -> None:
    code, _, err = cli(capsys, command[0], "--db", sqlite_url, *command[1:], bad)
    assert code == 2
    line = one_line_error(err)
    assert "is not a time: give an ISO 8601 date or datetime (naive = UTC)" in line
    assert "30s, 15m, 2h, 7d" in line


def test_a_database_without_the_tables_says_to_upgrade(empty_db_url, make_engine, capsys) -> None:
    engine = make_engine(empty_db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE unrelated (id integer)"))  # the database exists, ingest's tables do not
    code, _, err = cli(capsys, "list", "--db", empty_db_url)
    assert code == 1
    assert one_line_error(err).endswith(
        ": schema is at revision none, this ingest needs 0005 (missing messages, dead_letters, requests): "
        "run `ingest db upgrade`"
    )

    migrate.upgrade(engine, "0002")  # before receipts and dead-letter identities
    code, _, err = cli(capsys, "replay", "--db", empty_db_url, "--all")
    assert code == 1
    assert one_line_error(err).endswith(
        ": schema is at revision 0002, this ingest needs 0005 "
        "(missing dead_letters.ident, dead_letters.request, dead_letters.client, requests): run `ingest db upgrade`"
    )


def test_a_missing_sqlite_file_is_not_created(tmp_path, capsys) -> None:
    path = tmp_path / "nowhere.db"
    code, _, err = cli(capsys, "purge", "--db", f"sqlite:///{path}", "--before", "1d", "--yes")
    assert code == 1
    assert one_line_error(err) == f"ingest: error: sqlite:///{path}: no such database file: run `ingest db upgrade`"
    assert not path.exists()


def test_an_unreachable_database_is_one_line_with_the_password_masked(capsys) -> None:
    url = "postgresql://ingest:secret@127.0.0.1:1/ingest"  # nothing listens on port 1
    code, _, err = cli(capsys, "list", "--db", url)
    assert code == 1
    line = one_line_error(err)
    assert line.startswith("ingest: error: cannot use postgresql+psycopg://ingest:***@127.0.0.1:1/ingest: ")
    assert "secret" not in line


# --- times --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("30s", datetime(2026, 11, 27, 11, 59, 30, tzinfo=UTC)),
        ("15m", datetime(2026, 11, 27, 11, 45, tzinfo=UTC)),
        ("2h", datetime(2026, 11, 27, 10, 0, tzinfo=UTC)),
        ("7d", datetime(2026, 11, 20, 12, 0, tzinfo=UTC)),
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01T06:30:00", datetime(2026, 11, 1, 6, 30, tzinfo=UTC)),
        ("2026-11-01T06:30:00Z", datetime(2026, 11, 1, 6, 30, tzinfo=UTC)),
        ("2026-11-01 08:30+02:00", datetime(2026, 11, 1, 6, 30, tzinfo=UTC)),
    ],
)
def test_parse_when(given, expected) -> None:
    moment = dead_letters.parse_when(given, now=datetime(2026, 11, 27, 12, 0, tzinfo=UTC))
    assert moment == expected and moment.utcoffset() == timedelta(0)
