"""Error classification by class, and the backoff it retries with."""

import sqlite3

import psycopg
import pytest
from sqlalchemy import exc as sa_exc

from ingest.db.store import Backoff, classify
from ingest.errors import PermanentStoreError, TransientStoreError


def wrapped(orig: Exception) -> sa_exc.StatementError:
    """What SQLAlchemy raises for this driver error."""
    base = sqlite3.Error if isinstance(orig, sqlite3.Error) else psycopg.Error
    return sa_exc.DBAPIError.instance("INSERT", {}, orig, base)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (psycopg.errors.UntranslatableCharacter("nul"), PermanentStoreError),
        (psycopg.errors.UniqueViolation("dup"), PermanentStoreError),
        (psycopg.errors.SerializationFailure("retry"), TransientStoreError),
        (psycopg.errors.DeadlockDetected("deadlock"), TransientStoreError),
        (psycopg.errors.AdminShutdown("terminating"), TransientStoreError),
        (psycopg.OperationalError("connection refused"), TransientStoreError),
        (psycopg.errors.UndefinedTable("no table"), TransientStoreError),
        (sqlite3.OperationalError("database is locked"), TransientStoreError),
        (sqlite3.IntegrityError("constraint"), PermanentStoreError),
        (sa_exc.TimeoutError("pool"), TransientStoreError),
        (RuntimeError("a bug"), None),
        (KeyError("a bug"), None),
    ],
)
def test_classify_by_class_raw_and_wrapped(error, kind) -> None:
    assert classify(error) is kind
    assert classify(wrapped(error)) is kind


def test_classification_ignores_message_text() -> None:
    assert classify(sqlite3.OperationalError("UNIQUE constraint failed")) is TransientStoreError
    assert classify(psycopg.DataError("connection refused")) is PermanentStoreError


def test_backoff_is_capped_and_jittered() -> None:
    backoff = Backoff(base_s=0.1, cap_s=2.0)
    delays = [backoff.delay_s(attempt) for attempt in range(200) for _ in range(5)]
    assert all(0 <= d <= 2.0 for d in delays)
    assert max(backoff.delay_s(0) for _ in range(200)) <= 0.1
    assert len(set(delays)) > 100  # jitter: retries of many consumers do not march in step
    assert backoff.delay_s(10_000) <= 2.0


def test_stamps_render_each_moment_as_datetime_does() -> None:
    """tables.stamps renders moments by hand (a prefix a second): it must say what datetime
    says, microseconds rounded alike, in both databases' forms."""
    import random
    from datetime import UTC, datetime

    from ingest.db.tables import SQLITE_STAMP, stamps

    rng = random.Random(7)
    moments = [rng.uniform(0, 4e9) for _ in range(20_000)]
    moments += [1764243000.9999995, 1764243000.0000005, 1764243000.0000015, 1764243000.0, 0.5, 1.9999999]
    moments += [m for m in moments[:50]]  # repeats side by side, as a request's messages are
    moments.sort()
    for moment, iso, sqlite in zip(moments, stamps(moments, sqlite=False), stamps(moments, sqlite=True), strict=True):
        expected = datetime.fromtimestamp(moment, UTC)
        assert datetime.fromisoformat(iso) == expected, (moment, iso)
        assert sqlite == expected.strftime(SQLITE_STAMP), (moment, sqlite)
