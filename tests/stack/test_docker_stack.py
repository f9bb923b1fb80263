"""The real docker-compose.yml under a real Docker engine (issue 6).

Images that cannot be pulled here are local stand-ins (stack/standins/README.md); the ingest image
is built from the project's Dockerfile by `docker compose`. One compose project serves the module;
the tests run in file order, each leaving the stack as the next expects it, and the last one takes
it down. Host ports are free loopback ports, set through the compose file's STACK_*_PORT variables.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support.docker_support import Stack, docker, engine, engine_contents, prepare, running_container
from support.httpclient import request
from support.stack_support import DOCKERFILE, compose, free_port, prometheus_api
from support.waiting import wait_until

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]

QUEUE_SIZE = 10_000
SLOW_REQUEST_S = 5.0
BURST = 2_000_000  # messages in the load profile's burst round


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A Docker engine (started only if none answers, and then stopped), the images as the user's
    stack/prepare.py makes them, and a compose project on free host ports."""
    handle = engine(tmp_path_factory.mktemp("docker"))
    ports = {"proxy": free_port(), "prometheus": free_port(), "grafana": free_port()}
    stack = Stack(f"ingest-test-{uuid.uuid4().hex[:8]}", ports)
    try:
        stack.before = engine_contents()
        prepare(stack.env)
        yield stack
    finally:
        stack.compose("--profile", "*", "down", "-v", "--remove-orphans", "-t", "10", check=False)
        handle.stop()


def _healthy(stack: Stack, service: str, count: int = 1) -> bool:
    states = [stack.inspect(c)["State"] for c in stack.containers(service)]
    return len(states) == count and all(s.get("Health", {}).get("Status") == "healthy" for s in states)


def _events(stack: Stack, since: float) -> list[dict[str, Any]]:
    """Container events of the project since `since` (epoch s), oldest first."""
    out = docker("events", "--since", f"{since:.3f}", "--until", f"{time.time():.3f}",
                 "--filter", f"label=com.docker.compose.project={stack.project}",
                 "--filter", "type=container", "--format", "{{json .}}").stdout
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    # Containers run from the built image inherit its compose labels: keep the project's own.
    return [e for e in events if e["Actor"]["Attributes"].get("name", "").startswith(f"{stack.project}-")]


def _first(events: list[dict[str, Any]], service: str, status: str) -> int:
    for event in events:
        if event["Actor"]["Attributes"].get("com.docker.compose.service") == service and event["status"] == status:
            return int(event["timeNano"])
    seen = [(e["Actor"]["Attributes"].get("com.docker.compose.service"), e["status"]) for e in events]
    raise AssertionError(f"no {status!r} event for {service}: {seen}")


def _query(stack: Stack, expr: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = prometheus_api(stack.prometheus_url, "query", query=expr)["result"]
    return result


def _scalar(stack: Stack, expr: str) -> float | None:
    result = _query(stack, expr)
    return float(result[0]["value"][1]) if result else None


def _scraped(stack: Stack, service: str = "ingest") -> bool:
    """Prometheus scrapes exactly the running replicas (DNS discovery refreshes every 15 s)."""
    addresses = {
        f"{network['IPAddress']}:8080"
        for container in stack.containers(service)
        for network in stack.inspect(container)["NetworkSettings"]["Networks"].values()
    }
    up = {sample["metric"]["instance"] for sample in _query(stack, 'up{job="ingest"} == 1')}
    return bool(addresses) and up == addresses


def _headers(stack: Stack) -> dict[str, str]:
    """NDJSON with the load client's token, which the stack's `tokens` service made."""
    return {"Content-Type": "application/x-ndjson", "Authorization": f"Bearer {stack.token()}"}


def _ndjson(seqs: range, run: str) -> bytes:
    return b"".join(json.dumps({"run": run, "seq": s}).encode() + b"\n" for s in seqs)


def _assert_storing_while_refusing(stack: Stack, since: float) -> None:
    """From the first 503 to the last, the store rate never falls to 0: clients told to wait are
    told to come back when there is room, so the service is never idle while they sleep (a wait
    for the whole backlog left it idle, queue and spool empty, p99 4.4 s: issue 19)."""
    def series(expr: str) -> dict[float, float]:
        data = prometheus_api(stack.prometheus_url, "query_range", query=expr, start=f"{since:.0f}",
                              end=f"{time.time():.0f}", step="5")["result"]
        return {float(t): float(v) for t, v in data[0]["values"]} if data else {}

    refusing = series('sum(increase(ingest_http_requests_total{code="503"}[10s]))')
    stored = series("sum(rate(ingest_messages_stored_total[10s]))")
    times = [t for t, v in refusing.items() if v > 0]
    assert times, refusing
    span = [t for t in sorted(stored) if times[0] <= t <= times[-1]]
    idle = [t - since for t in span if stored[t] == 0]
    assert span and not idle, f"nothing stored at {idle} s while 503s went out ({times[0] - since:.0f}-"\
                               f"{times[-1] - since:.0f} s)"


# ---------------------------------------------------------------- image and start-up


def test_dockerfile_needs_no_frontend_image() -> None:
    """`# syntax=` makes BuildKit fetch a frontend image, which fails where no registry answers."""
    first_lines = DOCKERFILE.read_text().splitlines()[:5]
    assert not any(re.match(r"#\s*syntax\s*=", line) for line in first_lines)


def test_the_image_builds_with_buildkit_and_runs_as_10001(stack: Stack) -> None:
    built = stack.compose("build", "ingest", timeout_s=600, check=False)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    ids = docker("run", "--rm", "--entrypoint", "id", "ingest:local").stdout.strip()
    assert ids.startswith("uid=10001(ingest) gid=10001(ingest)"), ids


def test_up_starts_postgres_then_migrate_then_ingest_then_proxy(stack: Stack) -> None:
    since = time.time() - 1
    up = stack.compose("up", "-d", "--wait", timeout_s=300, check=False)  # no service named: Grafana is a profile
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    events = _events(stack, since)
    postgres_healthy = _first(events, "postgres", "health_status: healthy")
    migrate_start, migrate_die = _first(events, "migrate", "start"), _first(events, "migrate", "die")
    ingest_start = _first(events, "ingest", "start")
    ingest_healthy = _first(events, "ingest", "health_status: healthy")
    proxy_start = _first(events, "proxy", "start")
    timeline = [(e["timeNano"], e["Actor"]["Attributes"]["name"], e["status"]) for e in events]
    assert postgres_healthy < migrate_start < migrate_die < ingest_start < ingest_healthy < proxy_start, timeline
    (migrate,) = stack.containers("migrate", all_states=True)
    assert stack.inspect(migrate)["State"]["ExitCode"] == 0
    assert stack.sql("SELECT version_num FROM alembic_version") == "0005"


def test_messages_pushed_through_the_proxy_land_in_postgres(stack: Stack) -> None:
    run = uuid.uuid4().hex
    reply = request(f"{stack.proxy_url}/messages?ack=commit", "POST", _ndjson(range(250), run),
                    _headers(stack))
    assert reply.status == 201, reply.body
    assert reply.counts() == {"stored": 250, "duplicates": 0}
    assert stack.sql(f"SELECT count(*) FROM messages WHERE payload->>'run' = '{run}'") == "250"


# ---------------------------------------------------------------- replicas


def test_three_replicas_share_the_traffic_and_each_is_scraped(stack: Stack) -> None:
    stack.env["INGEST_REPLICAS"] = "3"
    stack.compose("up", "-d", "--no-deps", "ingest")
    wait_until(lambda: _healthy(stack, "ingest", 3), 120, "three healthy ingest replicas")
    stack.compose("up", "-d", "--no-deps", "ingest")  # `up` again keeps the three (issue 19)
    assert len(stack.containers("ingest")) == 3
    run = uuid.uuid4().hex
    for i in range(60):
        reply = request(f"{stack.proxy_url}/messages", "POST", _ndjson(range(i * 10, i * 10 + 10), run),
                        _headers(stack))
        assert reply.status == 202, reply.body

    def every_replica_received() -> list[dict[str, Any]] | None:
        up = _query(stack, 'up{job="ingest"} == 1')
        received = _query(stack, 'ingest_messages_received_total{job="ingest"} > 0')
        return received if len(up) == 3 and len(received) == 3 else None

    wait_until(lambda: _scraped(stack), 60, "Prometheus to scrape the three replicas")
    received = wait_until(every_replica_received, 90, "Prometheus to scrape three replicas, each with traffic")
    assert len({sample["metric"]["instance"] for sample in received}) == 3


@dataclass
class Pusher:
    """Client threads through the proxy: each request timed, 5xx and connection errors retried."""

    url: str
    run: str
    headers: dict[str, str]
    acked: set[int] = field(default_factory=set)
    durations: list[float] = field(default_factory=list)
    retried: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def work(self, first: int) -> None:
        seq = first
        while not self.stop.is_set():
            batch = range(seq, seq + 20)
            started = time.monotonic()
            try:
                status = request(f"{self.url}/messages", "POST", _ndjson(batch, self.run),
                                 self.headers, timeout_s=90).status
            except OSError:
                status = 0
            with self.lock:
                self.durations.append(time.monotonic() - started)
                if status == 202:
                    self.acked.update(batch)
                    seq += 20
                else:
                    assert status in (0, 502, 503), status
                    self.retried += 1
            if status != 202:
                self.stop.wait(0.2)  # a client's back-off, not a synchronisation


def test_scaling_down_under_load_stalls_no_request_and_loses_nothing(stack: Stack) -> None:
    """nginx kept removed replicas' addresses and waited 60 s to connect to them (issue 6, 3.2)."""
    assert _healthy(stack, "ingest", 3)
    pusher = Pusher(stack.proxy_url, uuid.uuid4().hex, _headers(stack))
    threads = [threading.Thread(target=pusher.work, args=(i * 10_000_000,), name=f"push-{i}") for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(pusher.acked) >= 2_000, 60, "load through the proxy")
        stack.compose("up", "-d", "--no-deps", "--scale", "ingest=1", "ingest", timeout_s=120)
        stack.env["INGEST_REPLICAS"] = "1"  # so that later `up`s keep the one
        after = len(pusher.durations)
        wait_until(lambda: len(pusher.durations) >= after + 200, 60, "200 more requests after the scale-down")
    finally:
        pusher.stop.set()
        for thread in threads:
            thread.join(120)
    slowest = max(pusher.durations)
    assert slowest < SLOW_REQUEST_S, f"a request took {slowest:.1f} s ({len(pusher.durations)} requests)"
    assert len(stack.containers("ingest")) == 1
    count = f"SELECT count(DISTINCT (payload->>'seq')::bigint) FROM messages WHERE payload->>'run' = '{pusher.run}'"
    wait_until(lambda: int(stack.sql(count)) >= len(pusher.acked), 60, "every acknowledged message stored")
    assert int(stack.sql(count)) == len(pusher.acked)


def _spool_status(stack: Stack) -> dict[str, str]:
    """`ingest spool status` of the shared spool directory, run in a replica: its summary lines."""
    out = stack.compose("exec", "-T", "ingest", "ingest", "spool", "status", "--spool", "/var/lib/ingest/spool/",
                        timeout_s=60).stdout
    return dict(line.split(None, 1) for line in out.splitlines() if not line.startswith("spool-"))


def test_a_scale_down_with_postgres_paused_leaves_no_acknowledged_message_behind(stack: Stack) -> None:
    """Issue 18: replicas scaled away past their drain deadline left their acknowledged messages
    in volumes no container mounts again. On the shared spool volume the replica that stays adopts
    their files, and stores every message once Postgres is back; nothing is scaled back up."""
    stack.compose("up", "-d", "--no-deps", "--scale", "ingest=3", "--wait", "ingest", timeout_s=180)
    run = uuid.uuid4().hex
    acked: list[int] = []

    def push(first: int, requests: int) -> None:
        for n in range(first, first + requests):
            seqs = range(n * 100, n * 100 + 100)
            reply = request(f"{stack.proxy_url}/messages", "POST", _ndjson(seqs, run), _headers(stack))
            assert reply.status == 202, reply.body
            acked.extend(seqs)

    push(0, 20)
    stack.compose("pause", "postgres")  # writes stall: what is acknowledged now waits in the spools
    try:
        push(20, 100)
        assert int(_spool_status(stack)["files"]) == 3
        # The two removed replicas drain until their 30 s deadline, then exit leaving their spools.
        stack.compose("up", "-d", "--no-deps", "--scale", "ingest=1", "ingest", timeout_s=180)
        assert len(stack.containers("ingest")) == 1
        (survivor,) = stack.containers("ingest")
        wait_until(lambda: _spool_status(stack)["files"] == "1", 60, "the two orphaned spools adopted")
        assert _spool_status(stack)["orphaned"] == "0"
        adopted = [line for line in docker("logs", survivor).stderr.splitlines() if "(its process is gone)" in line]
        assert len(adopted) == 2, adopted
    finally:
        stack.compose("unpause", "postgres")
    count = f"SELECT count(DISTINCT (payload->>'seq')::bigint) FROM messages WHERE payload->>'run' = '{run}'"
    wait_until(lambda: int(stack.sql(count)) == len(acked) == 12_000, 120, "all 12,000 acknowledged messages stored")
    assert stack.sql(f"SELECT count(*) FROM messages WHERE payload->>'run' = '{run}'") == "12000"
    assert len(stack.containers("ingest")) == 1, "never scaled back up"


def test_with_no_replica_left_the_absence_alert_goes_off(stack: Stack) -> None:
    """Docker's DNS drops stopped replicas, so `up == 0` never shows them (issue 6, 3.3)."""
    stack.compose("stop", "ingest", timeout_s=120)
    # Once nginx's 1 s DNS cache has let go of the stopped replicas, there is nowhere to go.
    wait_until(lambda: request(f"{stack.proxy_url}/healthz").status == 502, 30, "the proxy to answer 502")

    def alert_state() -> str | None:
        alerts = prometheus_api(stack.prometheus_url, "alerts")["alerts"]
        states = [a["state"] for a in alerts if a["labels"]["alertname"] == "IngestNoReplicas"]
        return states[0] if states else None

    assert wait_until(alert_state, 90, "IngestNoReplicas to be pending") in ("pending", "firing")
    assert _scalar(stack, 'absent(up{job="ingest"})') == 1.0
    assert not _query(stack, 'up{job="ingest"} == 0'), "the target vanished: `up == 0` cannot catch this"


def test_a_stop_right_after_start_is_not_lost(stack: Stack) -> None:
    """ingest as PID 1 ignored SIGTERM until its handlers were installed (issue 6, 3.4)."""
    stack.compose("stop", "ingest", timeout_s=120)
    (container,) = stack.containers("ingest", all_states=True)
    docker("start", container)
    time.sleep(0.3)  # the scenario itself: a stop 0.3 s into start-up
    started = time.monotonic()
    docker("stop", "-t", "40", container, timeout_s=60)
    took = time.monotonic() - started
    state = stack.inspect(container)["State"]
    assert took < 10, f"docker stop took {took:.1f} s"
    assert state["ExitCode"] in (0, 143), state  # drained (0) or ended by the signal; never SIGKILL (137)
    stack.compose("up", "-d", "--no-deps", "--wait", "ingest", timeout_s=180)


def test_a_killed_replica_keeps_what_it_acknowledged_in_its_spool(stack: Stack) -> None:
    """SIGKILL while the database is away: the 202s were on the shared spool volume, and the
    same container, restarted while the database is still away, accepts again and adopts them
    (any other replica would, too); all are stored once the database is back."""
    (container,) = stack.containers("ingest")
    run = uuid.uuid4().hex

    def push(first: int) -> None:
        for i in range(first, first + 20):
            reply = request(f"{stack.proxy_url}/messages", "POST", _ndjson(range(i * 50, i * 50 + 50), run),
                            _headers(stack))
            assert reply.status == 202, reply.body

    stack.compose("pause", "postgres")  # writes stall; acknowledged messages wait in the spool
    try:
        push(0)
        docker("kill", "-s", "KILL", container)
        docker("start", container)
        # Restarted, it is a new process with a spool file of its own: it starts without the
        # database (db/gate.py), accepts, and adopts the file it left.
        wait_until(lambda: "(its process is gone)" in docker("logs", container).stderr, 120,
                   "the restarted replica to adopt its old spool")
        wait_until(lambda: request(f"{stack.proxy_url}/healthz").status == 200, 60, "the proxy to reach it again")
        push(20)
        assert "starting anyway" in docker("logs", container).stderr
    finally:
        stack.compose("unpause", "postgres")
    count = f"SELECT count(DISTINCT (payload->>'seq')::int) FROM messages WHERE payload->>'run' = '{run}'"
    wait_until(lambda: stack.sql(count) == "2000", 120, "all 2,000 acknowledged messages stored")
    assert stack.sql(f"SELECT count(*) FROM messages WHERE payload->>'run' = '{run}'") == "2000"
    wait_until(lambda: _healthy(stack, "ingest", 1), 120, "the replica healthy again")


# ---------------------------------------------------------------- the load profile


def test_the_load_generator_stops_at_once(stack: Stack) -> None:
    """Its `sh -c` loop, as PID 1, ignored SIGTERM and was killed after 10 s (issue 6, 3.4)."""
    stack.compose("--profile", "load", "up", "-d", "--no-deps", "load")
    time.sleep(0.3)  # the scenario itself: a stop right after start
    started = time.monotonic()
    stack.compose("--profile", "load", "stop", "load", timeout_s=60)
    took = time.monotonic() - started
    (container,) = stack.containers("load", all_states=True)
    state = stack.inspect(container)["State"]
    assert took < 5, f"stopping the load generator took {took:.1f} s"
    assert state["ExitCode"] != 137, state
    assert "Health" not in state, state  # no health check: never `(unhealthy)` (issue 19)


def test_the_load_profile_fills_the_queue_gets_503_and_loses_nothing(stack: Stack) -> None:
    """The burst must overflow the stack for longer than a scrape (issue 6, 3.5)."""
    assert _healthy(stack, "ingest", 1)
    wait_until(lambda: _scraped(stack), 60, "Prometheus to scrape the replica")
    stack.sql("TRUNCATE messages")
    since = time.time()
    stack.compose("--profile", "load", "up", "-d", "--no-deps", "--force-recreate", "load")
    (container,) = stack.containers("load")

    def burst_summary() -> str | None:
        logs = docker("logs", container).stdout
        return logs if f"acknowledged  {BURST}" in logs else None

    summary = wait_until(burst_summary, 240, "the burst round of the load profile to finish")
    retried = re.search(r"retried\s+(\d+)", summary)
    assert retried and int(retried.group(1)) > 0, summary
    assert re.search(r"failed\s+0 messages", summary), summary
    window = f"[{int(time.time() - since) + 10}s]"
    # A range selector in an instant query returns the raw scraped samples.
    samples = [float(v) for series in _query(stack, f"ingest_queue_depth{window}") for _t, v in series["values"]]
    full = sum(value >= 0.9 * QUEUE_SIZE for value in samples)
    assert full >= 3, f"the queue was seen at >= 90 % in {full} scrapes: {samples}"
    refused = _scalar(stack, f'sum(increase(ingest_http_requests_total{{code="503"}}{window}))')
    assert refused is not None and refused > 0
    _assert_storing_while_refusing(stack, since)
    wait_until(lambda: (_scalar(stack, "max(ingest_queue_depth)") or 0) < 0.1 * QUEUE_SIZE, 60,
               "the queue to drain after the burst")
    stack.compose("--profile", "load", "stop", "load", timeout_s=60)
    assert "stopped       by SIGTERM" in docker("logs", container).stdout  # the running push's summary
    distinct = "SELECT count(DISTINCT (payload->>'seq')::bigint) FROM messages"
    wait_until(lambda: int(stack.sql(distinct)) >= BURST, 60, "the whole burst stored")
    assert int(stack.sql(distinct)) == BURST


def test_down_v_leaves_nothing_running(stack: Stack) -> None:
    """Every container and volume on the engine, not only the project's: anonymous volumes carry
    no project label, and `down -v` without the load profile left its container and the tokens
    volume (issue 19), and replicas removed by a scale-down left their anonymous spool volumes
(now one named volume shared by all). `--profile '*'` takes down the services of every profile."""
    stack.compose("--profile", "*", "down", "-v", "-t", "30", timeout_s=180)
    assert stack.leftovers() == {"containers": [], "volumes": [], "networks": []}
    left = engine_contents().left_since(stack.before, stack.project)
    assert left["containers"] == []
    assert left["volumes"] == []


# ---------------------------------------------------------------- postgres health


def test_postgres_is_not_healthy_while_its_first_start_listens_on_the_socket_only(
    stack: Stack, tmp_path: Path,
) -> None:
    """`pg_isready` without -h said healthy during init and released `migrate` early (3.6)."""
    postgres = compose()["services"]["postgres"]
    kind, check = postgres["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    initdb = tmp_path / "initdb"
    initdb.mkdir()
    (initdb / "hold.sh").write_text("while [ ! -e /tmp/release ]; do sleep 0.1; done\n")
    env = [f"--env={k}={v}" for k, v in postgres["environment"].items()]
    image = postgres["image"].replace("${STACK_IMAGE_PREFIX-}", stack.env.get("STACK_IMAGE_PREFIX", ""))
    with running_container(*env, "-v", f"{initdb}:/docker-entrypoint-initdb.d:ro", image) as box:
        wait_until(lambda: "hold.sh" in docker("logs", box).stdout + docker("logs", box).stderr, 120,
                   "the init scripts to run")
        socket_only = docker("exec", box, "pg_isready", "-U", "ingest", "-d", "ingest", check=False)
        assert socket_only.returncode == 0, "the first start's socket-only server should be up by now"
        assert docker("exec", box, "sh", "-c", check, check=False).returncode != 0
        docker("exec", box, "touch", "/tmp/release")
        wait_until(lambda: docker("exec", box, "sh", "-c", check, check=False).returncode == 0, 60,
                   "the health check to pass once the real server listens on TCP")


def test_the_stack_refuses_pushes_without_its_token(stack: Stack) -> None:
    """Runs after down -v: brings the core up again just long enough to knock without a token."""
    stack.compose("up", "-d", "--wait", timeout_s=300)
    try:
        reply = request(f"{stack.proxy_url}/messages", "POST", b'{"a": 1}', {"Content-Type": "application/json"})
        assert reply.status == 401 and reply.headers["www-authenticate"] == "Bearer"
        stack.cached_token = None  # a new volume, a new token
        reply = request(f"{stack.proxy_url}/messages", "POST", _ndjson(range(3), "t"), _headers(stack))
        assert reply.status == 202, reply.body
    finally:
        stack.compose("--profile", "*", "down", "-v", "-t", "30", timeout_s=180)
