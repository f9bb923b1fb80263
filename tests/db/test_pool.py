"""The BoundedSemaphore in front of the connections: a cap you can see."""

import threading

from ingest.db.pool import ConnectionPool
from support.waiting import wait_until


def test_consumers_beyond_the_pool_size_wait_visibly(sqlite_url) -> None:
    pool = ConnectionPool(sqlite_url, size=1)
    release = threading.Event()
    got_second = threading.Event()

    def holder() -> None:
        with pool.connection():
            release.wait(30)

    def second() -> None:
        with pool.connection():
            got_second.set()

    first = threading.Thread(target=holder)
    first.start()
    wait_until(lambda: pool.in_use == 1, what="first connection held")
    waiter = threading.Thread(target=second)
    waiter.start()
    wait_until(lambda: pool.waiting == 1, what="second consumer waiting")
    assert not got_second.is_set() and pool.in_use == 1
    release.set()
    assert got_second.wait(30)
    first.join()
    waiter.join()
    assert (pool.in_use, pool.waiting) == (0, 0)
    pool.dispose()


def test_counters_stay_exact_under_contention(sqlite_url) -> None:
    pool = ConnectionPool(sqlite_url, size=2)
    peak = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(50):
            with pool.connection(), lock:
                peak.append(pool.in_use)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(peak) <= 2
    assert (pool.in_use, pool.waiting) == (0, 0)
    pool.dispose()


def test_sqlite_runs_in_wal_mode(sqlite_url) -> None:
    from sqlalchemy import text

    pool = ConnectionPool(sqlite_url, size=1)
    with pool.connection() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
    pool.dispose()


def test_postgres_connections_carry_keepalives_and_the_statement_timeout(postgres_url) -> None:
    from sqlalchemy import text

    pool = ConnectionPool(postgres_url, size=1, statement_timeout_s=2.5)
    with pool.connection() as conn:
        assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "2500ms"
        params = conn.connection.driver_connection.info.get_parameters()
    assert (params["keepalives"], params["keepalives_idle"], params["tcp_user_timeout"]) == ("1", "10", "30000")
    pool.dispose()


def test_a_call_the_database_never_answers_is_cut_once_overdue_and_the_next_gets_a_fresh_connection(
    postgres_url,
) -> None:
    """A frozen link: the server neither answers nor refuses. Only the client-side cut ends the call."""
    from urllib.parse import urlsplit

    import pytest
    from sqlalchemy.exc import OperationalError

    from support.tcpproxy import TcpProxy

    dsn = urlsplit(postgres_url)
    proxy = TcpProxy(dsn.hostname or "127.0.0.1", dsn.port or 5432)
    via = postgres_url.replace(f"@{dsn.hostname}:{dsn.port}/", f"@127.0.0.1:{proxy.port}/", 1)
    pool = ConnectionPool(via, size=1, statement_timeout_s=0.5)
    try:
        pool.ping()  # a pooled connection, open before the link freezes
        proxy.freeze()
        errors: list[BaseException] = []

        def ping() -> None:
            with pytest.raises(OperationalError) as caught:
                pool.ping()
            errors.append(caught.value)

        caller = threading.Thread(target=ping, name="held-caller")
        caller.start()
        wait_until(lambda: pool.in_use == 1, what="the call held in the frozen database")
        assert pool.cut_overdue() == 0  # not overdue yet: 0.5 s + the 1 s grace
        wait_until(lambda: pool.cut_overdue() == 1, timeout_s=10, what="the overdue call cut")
        caller.join(10)
        assert not caller.is_alive() and len(errors) == 1
        assert pool.in_use == 0
        assert pool.interrupt() == 0  # nothing held any more, nothing cut twice
        proxy.thaw()
        pool.ping()  # the cut connection was invalidated: this one is fresh, and answers
    finally:
        pool.dispose()
        proxy.close()


def test_a_connection_is_cut_once_however_often_the_stop_interrupts(sqlite_url) -> None:
    """Past the drain deadline the stop interrupts every 0.5 s: a connection already cut is not
    cut (nor counted in ingest_db_calls_cut_total) again."""
    pool = ConnectionPool(sqlite_url, size=1)
    try:
        with pool.connection():
            assert pool.interrupt() == 1
            assert pool.interrupt() == 0
            assert pool.cut_overdue() == 0
        assert pool.interrupt() == 0
    finally:
        pool.dispose()
