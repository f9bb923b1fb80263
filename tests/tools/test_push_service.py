"""`ingest push` against a real service under backpressure: 503s are retried, nothing is lost."""

import sqlite3
import threading

from ingest.tools.push import PushOptions, PushSummary, run
from support.probes import count_rows, metric
from support.waiting import wait_until


def test_push_rides_out_backpressure_and_everything_is_stored(make_service, make_engine, sqlite_url) -> None:
    service = make_service(queue_size=200, consumers=1, batch_size=50, enqueue_timeout_s=0.05)
    engine = make_engine(sqlite_url)
    lock = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # stall the database: the queue fills, the service answers 503
    results: list[PushSummary] = []
    options = PushOptions(url=service.url, count=2000, batch=50, concurrency=4)
    pusher = threading.Thread(target=lambda: results.append(run(options)), name="push")
    pusher.start()
    wait_until(
        lambda: metric(service, "ingest_messages_rejected_total", {"reason": "queue_full", "client": "anonymous"}) > 0,
        what="503s for queue_full",
    )
    lock.execute("ROLLBACK")
    lock.close()
    pusher.join(120)
    [summary] = results
    assert summary.ok, summary.format()
    assert summary.acknowledged == 2000 and summary.retried >= 1 and summary.failed == 0
    wait_until(lambda: count_rows(engine) == 2000, what="all 2000 rows")


def test_push_ack_commit_gets_201s(make_service, make_engine, sqlite_url) -> None:
    service = make_service()
    summary = run(PushOptions(url=service.url, count=300, batch=1, concurrency=8, ack="commit"))
    assert summary.ok and summary.acknowledged == 300
    assert metric(service, "ingest_http_requests_total", {"code": "201"}) == 300
    assert count_rows(make_engine(sqlite_url)) == 300  # committed before each 201


def test_push_exits_1_when_messages_are_refused_and_0_when_all_are_acknowledged(make_service) -> None:
    import subprocess
    import sys

    strict = make_service(max_body_bytes=100)  # a batch of 5 generated messages is larger
    command = [sys.executable, "-m", "ingest", "push", "--url", strict.url, "--count", "10", "--batch", "5"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "failed        10 messages" in refused.stdout and "413" in refused.stdout
    command[command.index("--batch") + 1] = "1"
    accepted = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "acknowledged  10" in accepted.stdout


def test_push_idempotent_retries_timeouts_and_stores_each_message_once(make_service, make_engine, sqlite_url) -> None:
    """A stalled database makes ack=commit requests time out while their messages wait in the
    queue; the keys let push send them again, and the service stores each message once."""
    service = make_service(consumers=1, batch_size=50)
    engine = make_engine(sqlite_url)
    lock = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    results: list[PushSummary] = []
    options = PushOptions(url=service.url, count=200, batch=50, concurrency=4, ack="commit",
                          request_timeout_s=0.5, idempotent=True)
    pusher = threading.Thread(target=lambda: results.append(run(options)), name="push")
    pusher.start()
    wait_until(lambda: metric(service, "ingest_messages_received_total", {"client": "anonymous"}) >= 400, 30,
               what="every request sent at least twice (timeouts retried)")
    lock.execute("ROLLBACK")
    lock.close()
    pusher.join(120)
    [summary] = results
    assert summary.ok and summary.acknowledged == 200 and summary.retried >= 4, summary.format()
    wait_until(lambda: metric(service, "ingest_messages_duplicate_total") >= 200, 30,
               what="the retried copies found as duplicates")
    assert count_rows(engine) == 200


def test_push_receipts_says_all_stored_and_exits_0(make_service) -> None:
    import subprocess
    import sys

    service = make_service()
    command = [sys.executable, "-m", "ingest", "push", "--url", service.url, "--count", "3000", "--batch", "10",
               "--receipts"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "receipts      100 of 300 requests checked: all stored" in done.stdout


def test_push_receipts_names_dead_letters_and_exits_1(make_service, make_engine, postgres_url) -> None:
    import subprocess
    import sys

    from sqlalchemy import text

    service = make_service(db_url=postgres_url)
    with make_engine(postgres_url).begin() as conn:  # the database refuses message 7
        conn.execute(text("ALTER TABLE messages ADD CONSTRAINT not_seven CHECK ((payload->>'seq')::int <> 7)"))
    command = [sys.executable, "-m", "ingest", "push", "--url", service.url, "--count", "40", "--batch", "1",
               "--receipts"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "acknowledged  40" in done.stdout
    assert "receipts      40 of 40 requests checked: NOT all stored: 39 all stored, 1 with dead letters" in done.stdout


def test_push_receipts_reports_pending_when_the_database_stalls(make_service, sqlite_url) -> None:
    import subprocess
    import sys

    service = make_service()
    lock = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        command = [sys.executable, "-m", "ingest", "push", "--url", service.url, "--count", "20", "--batch", "5",
                   "--receipts", "--receipt-timeout", "1"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "receipts      4 of 4 requests checked: NOT all stored: 4 still pending after 1 s" in done.stdout


def test_push_prints_its_summary_when_stopped_by_sigterm(make_service) -> None:
    """`docker compose stop load` sends SIGTERM: the pusher says how far it got, then exits."""
    import signal
    import subprocess
    import sys

    service = make_service()
    command = [sys.executable, "-m", "ingest", "push", "--url", service.url, "--count", "1000000",
               "--batch", "10", "--rate", "200"]  # 5,000 s at this rate: only a signal ends it
    pusher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: metric(service, "ingest_http_requests_total", {"code": "202"}) >= 5,
                   what="the pusher's first acknowledged requests")
        pusher.send_signal(signal.SIGTERM)
        out, err = pusher.communicate(timeout=30)
    finally:
        pusher.kill()
    assert pusher.returncode == 1, out + err  # not every message was sent: not a success
    assert "stopped       by SIGTERM" in out, out + err
    acknowledged = int(out.split("acknowledged  ")[1].split()[0])
    assert acknowledged >= 50, out
