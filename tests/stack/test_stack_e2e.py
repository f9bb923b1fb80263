"""The stack run for real, minus Docker: a real `ingest serve` on the real Postgres (behind a TCP
proxy the test can cut, to stall the database); the project's nginx config in
front of it (Debian's nginx, upstream and listen rewritten to loopback); a real Prometheus
(Debian's binary) scraping it with the project's own config and alert rules (target rewritten to
loopback, intervals shortened); load from `ingest push` through the proxy; every dashboard query
and alert expression evaluated through Prometheus's HTTP API; one alert provoked until it fires."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.httpclient import request
from support.serving import serving
from support.stack_support import (
    ALERT_RULES,
    DOCKERFILE,
    NGINX_CONFIG,
    PROMETHEUS_CONFIG,
    alert_rules,
    answers,
    clean_env,
    concrete,
    dashboard,
    dashboard_queries,
    exposed_names,
    free_port,
    ingest_command,
    metric_names,
    metrics_text,
    port_of,
)
from support.tcpproxy import TcpProxy
from support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

SCRAPE_INTERVAL = "1s"
RATE_INTERVAL = "15s"  # what Grafana's $__rate_interval would be at least, for a 1 s scrape
SHORT_FOR = "2s"
PROVOKED_ALERT = "IngestQueueNearlyFull"


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        answer = request(f"{self.url}/api/v1/{path}{query}")
        reply = json.loads(answer.body)
        assert answer.status == 200 and reply["status"] == "success", (
            f"{path} {params}: {answer.status} {answer.body[:500]!r}"
        )
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def firing(self) -> set[str]:
        return {a["labels"]["alertname"] for a in self.api("alerts")["alerts"] if a["state"] == "firing"}


def _prometheus_files(tmp_path: Path, target: str) -> Path:
    """The project's config and rules, changed only where a loopback test must change them."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = SCRAPE_INTERVAL
    config["global"]["evaluation_interval"] = SCRAPE_INTERVAL
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "ingest"]
    assert job.pop("dns_sd_configs"), "the project config discovers replicas by DNS"
    job["static_configs"] = [{"targets": [target]}]
    rules = yaml.safe_load(ALERT_RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = SHORT_FOR
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    config["rule_files"] = [str(tmp_path / "alerts.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def prometheus(tmp_path: Path, target: str) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(binary).is_file():
        pytest.fail("prometheus is missing: apt-get install -y prometheus")
    config = _prometheus_files(tmp_path, target)
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(process, f"http://127.0.0.1:{port}", log)
    try:
        wait_until(
            lambda: process.poll() is not None or answers(f"{server.url}/-/ready"),
            30,
            "Prometheus to be ready",
        )
        assert process.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
        yield server
    finally:
        _terminate(process)


@contextmanager
def proxy(tmp_path: Path, upstream_port: int) -> Iterator[str]:
    """The project's nginx.conf with only its two network addresses moved to loopback."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).is_file():
        pytest.fail("nginx is missing: apt-get install -y nginx")
    port = free_port()
    conf = NGINX_CONFIG.read_text()
    rewritten = re.sub(r"listen\s+\d+;", f"listen 127.0.0.1:{port};", conf)
    rewritten = re.sub(r"http://ingest:\d+;", f"http://127.0.0.1:{upstream_port};", rewritten)
    assert rewritten.count("127.0.0.1:") == 2, "the proxy config changed shape: update this rewrite"
    path = tmp_path / "nginx.conf"
    path.write_text(rewritten)
    log = tmp_path / "nginx.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [binary, "-c", str(path), "-e", "stderr", "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is not None or answers(f"{url}/readyz"), 15, "nginx to proxy /readyz")
        assert process.poll() is None, f"nginx exited:\n{log.read_text()[-3000:]}"
        yield url
    finally:
        _terminate(process)


def _terminate(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _has_numbers(result: list[dict[str, Any]]) -> bool:
    return bool(result) and all(not math.isnan(float(series["value"][1])) for series in result)


def _healthcheck(port: int) -> int:
    """Run the Dockerfile's HEALTHCHECK command, as Docker would inside the container."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    argv = json.loads(text.split("HEALTHCHECK", 1)[1].split("CMD", 1)[1].strip().splitlines()[0])
    assert argv[0] == "python"
    done = subprocess.run(
        [sys.executable, *argv[1:]], env=clean_env(INGEST_PORT=str(port)), capture_output=True, timeout=10
    )
    return done.returncode


def _push(service_url: str, tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    log = tmp_path / f"push-{len(list(tmp_path.glob('push-*')))}.log"
    with log.open("wb") as sink:
        return subprocess.Popen(
            ingest_command("push", "--url", service_url, "--batch", "100", *args),
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )


@pytest.fixture
def database(postgres_url: str) -> Iterator[tuple[str, TcpProxy]]:
    """The test's Postgres database, reached through a proxy that can be cut."""
    host_port = postgres_url.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.split(":")
    tcp = TcpProxy(host, int(port))
    try:
        yield postgres_url.replace(host_port, f"127.0.0.1:{tcp.port}"), tcp
    finally:
        tcp.close()


def test_dashboard_queries_return_data_and_a_stalled_database_fires_the_queue_alert(
    tmp_path: Path, database: tuple[str, TcpProxy]
) -> None:
    db_url, tcp = database
    with serving(
        ["--db", db_url, "--consumers", "2", "--queue-size", "1000",
         "--batch-size", "100", "--enqueue-timeout", "0.2"]
    ) as service, prometheus(tmp_path, f"127.0.0.1:{port_of(service.url)}") as prom, proxy(
        tmp_path, port_of(service.url)
    ) as proxy_url:
        port = port_of(service.url)
        wait_until(
            lambda: [s for s in prom.query('up{job="ingest"}') if s["value"][1] == "1"],
            30,
            "Prometheus to scrape ingest",
        )

        # Every name the dashboard and the rules use is exported by the live service.
        live = exposed_names(metrics_text(service.url))
        used = {n for _t, expr in dashboard_queries(dashboard()) for n in metric_names(expr)}
        used |= {n for rule in alert_rules() for n in metric_names(rule["expr"])}
        assert used - live == set()

        # The image's health check passes against a ready service.
        assert _healthcheck(port) == 0

        # Steady load through the proxy while the dashboard is read: every query must come back
        # with numbers.
        steady = _push(proxy_url, tmp_path, "--count", "20000", "--concurrency", "4", "--rate", "2000")
        try:
            pending = dict.fromkeys(concrete(expr, RATE_INTERVAL) for _t, expr in dashboard_queries(dashboard()))

            def all_answered() -> bool:
                for expr in list(pending):
                    if _has_numbers(prom.query(expr)):
                        pending.pop(expr)
                return not pending

            try:
                wait_until(all_answered, 30, "every dashboard query to return numbers")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; still empty or NaN: {list(pending)}") from None
            instances = prom.api("label/instance/values", **{"match[]": "ingest_queue_capacity"})
            assert instances == [f"127.0.0.1:{port}"], "the $instance variable would be empty"
            assert steady.wait(timeout=60) == 0, (tmp_path / "push-0.log").read_text()
        finally:
            if steady.poll() is None:
                steady.kill()
                steady.wait(timeout=10)

        # Every alert expression is valid PromQL against the real series.
        for rule in alert_rules():
            prom.query(rule["expr"])

        # Stall the database: cut the connections to Postgres, so every batch write fails and is
        # retried; the queue fills behind the consumers.
        burst: subprocess.Popen[bytes] | None = None
        try:
            try:
                tcp.cut()
                burst = _push(proxy_url, tmp_path, "--count", "3000", "--concurrency", "4")
                wait_until(lambda: PROVOKED_ALERT in prom.firing(), 30, f"{PROVOKED_ALERT} to fire")
                wait_until(lambda: prom.query("ingest_db_retries_total > 0"), 15, "the stall to show as retries")
                wait_until(
                    lambda: prom.query('ingest_messages_rejected_total{reason="queue_full"} > 0'),
                    15,
                    "503s for queue_full to reach the clients through the proxy",
                )
                wait_until(lambda: _healthcheck(port) != 0, 15, "the health check to fail while stalled")
            finally:
                tcp.restore()

            # Released: the retried batches and the backlog are written, and nothing was lost.
            assert burst.wait(timeout=60) == 0, (tmp_path / "push-1.log").read_text()
            wait_until(
                lambda: prom.query("ingest_messages_stored_total == 23000"), 30, "everything pushed to be stored"
            )
            wait_until(lambda: _healthcheck(port) == 0, 15, "the health check to pass again")
        finally:
            if burst is not None and burst.poll() is None:
                burst.kill()
                burst.wait(timeout=10)
