"""With a spool, a start while the database is away: the service accepts into the spool and the
consumers wait at the database gate (db/gate.py) until it answers.

Seen under Docker: a replica recreated while Postgres was paused could not start ("cannot read
the schema revision of the database"), so it neither accepted nor adopted the spools of the
replicas scaled away until Postgres came back.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from urllib.parse import urlsplit

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import ProgrammingError
from test_spool import _post, _stored_seqs, _via
from test_spool_directory import _free_port

from ingest.config import Settings
from ingest.service import EXIT_START_FAILED, Service
from support.httpclient import request
from support.serving import serving
from support.tcpproxy import TcpProxy
from support.waiting import wait_until


@pytest.fixture
def database_away(postgres_url: str):  # type: ignore[no-untyped-def]
    """A proxy to a fresh Postgres database, cut: connects are refused until `restore()`."""
    proxy = TcpProxy("127.0.0.1", urlsplit(postgres_url).port or 5432)
    proxy.cut()
    try:
        yield proxy
    finally:
        proxy.close()


def test_a_spool_lets_the_service_start_without_the_database_and_store_once_it_answers(
    make_service, make_engine, postgres_url, database_away, tmp_path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="ingest")
    service = make_service(db_url=_via(database_away, postgres_url), spool=f"{tmp_path}/spool/", consumers=2)
    assert not service.gate.opened.is_set()
    assert any("starting anyway; what is accepted waits in the spool" in r.getMessage() for r in caplog.records)
    for first in range(0, 500, 50):
        assert _post(service.url, range(first, first + 50)) == 202
    assert request(f"{service.url}/healthz").status == 200, "every thread is alive, waiting"
    wait_until(lambda: b"database unreachable" in request(f"{service.url}/readyz").body, 30, "/readyz to say why")
    assert service.supervisor.alive() == 2 and not service.gate.opened.is_set()

    database_away.restore()
    assert service.gate.opened.wait(30), "the gate opens once the database answers"
    engine = make_engine(postgres_url)
    wait_until(lambda: _stored_seqs(engine) == (set(range(500)), 500), 60, "every 202 stored once")
    wait_until(lambda: request(f"{service.url}/readyz").status == 200, 30, "ready once the database answers")
    assert any("the database answers after" in r.getMessage() for r in caplog.records)


def test_without_a_spool_a_start_without_the_database_still_fails(postgres_url, database_away) -> None:
    """Memory mode keeps what it accepts in memory only: it refuses to start rather than pile up."""
    service = Service(Settings.from_mapping({"port": 0, "db_url": _via(database_away, postgres_url)}))
    with pytest.raises(Exception, match="cannot migrate the database"):
        service.start()


def test_a_database_that_answers_with_the_wrong_schema_stops_the_service(
    make_engine, postgres_url, database_away, tmp_path
) -> None:
    """Started --no-migrate while the database was away; it comes back without ingest's schema:
    the service stops as a start would have, keeping what it accepted in its spool."""
    settings = Settings.from_mapping({"port": 0, "db_url": _via(database_away, postgres_url), "migrate": False,
                                      "spool": str(tmp_path / "spool.db"), "drain_timeout_s": 5.0})
    service = Service(settings)
    service.start()
    codes: list[int] = []
    main = threading.Thread(target=lambda: codes.append(service.run()), name="test-main-loop")
    main.start()
    try:
        assert _post(service.url, range(10)) == 202
        database_away.restore()
        main.join(60)
        assert codes == [EXIT_START_FAILED]
    finally:
        service.shutdown.stopping.set()
        main.join(60)
        service.stop()
    with make_engine(postgres_url).connect() as conn:
        assert conn.execute(text("SELECT to_regclass('messages')")).scalar() is None, "nothing was written"
    reopened = Service(dataclasses.replace(settings, migrate=True))
    reopened.start()
    try:
        engine = make_engine(postgres_url)
        wait_until(lambda: _stored_seqs(engine) == (set(range(10)), 10), 60, "the spool's 10 stored by the next start")
    finally:
        reopened.stop()


def test_two_workers_on_a_spool_directory_start_without_the_database_and_migrate_once_it_answers(
    make_engine, postgres_url, database_away, tmp_path
) -> None:
    """The parent could not migrate: each worker starts anyway and migrates at its gate (the
    database is fresh: no schema yet), one of them losing the race harmlessly."""
    port = _free_port()
    args = ["--workers", "2", "--port", str(port), "--db", _via(database_away, postgres_url),
            "--spool", f"{tmp_path}/spool/", "--consumers", "1"]
    with serving(args, wait_ready=False) as proc:
        try:
            wait_until(lambda: any("(2 workers," in line for line in proc.log), 60, "the parent's ready line")
        except AssertionError as exc:
            raise AssertionError("".join(proc.log)) from exc
        assert any("starting the workers anyway" in line for line in proc.log), "".join(proc.log)
        url = f"http://127.0.0.1:{port}"
        for first in range(0, 400, 40):
            assert _post(url, range(first, first + 40)) == 202
        database_away.restore()
        engine = make_engine(postgres_url)
        wait_until(lambda: _stored_or_none(engine) == (set(range(400)), 400), 90, "every 202 stored once")
        assert sum("the database answers after" in line for line in proc.log) == 2, "".join(proc.log)
        proc.process.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(proc.log)


def _stored_or_none(engine: Engine) -> tuple[set[int], int] | None:
    """None until a worker's migration has made the table."""
    try:
        return _stored_seqs(engine)
    except ProgrammingError:
        return None
