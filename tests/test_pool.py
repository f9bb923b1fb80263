"""The BoundedSemaphore in front of the connections: a cap you can see."""

import threading

from ingest.pool import ConnectionPool
from waiting import wait_until


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
