"""Shared by the stack tests (test_stack, test_stack_e2e, test_top): the files of the container
stack, the PromQL they contain, and small HTTP helpers. A real `ingest serve` comes from serving.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from support.httpclient import request

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS_CONFIG = ROOT / "config" / "prometheus" / "prometheus.yml"
ALERT_RULES = ROOT / "config" / "prometheus" / "alerts.yml"
NGINX_CONFIG = ROOT / "config" / "nginx" / "nginx.conf"
GRAFANA_DATASOURCES = ROOT / "config" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDERS = ROOT / "config" / "grafana" / "provisioning" / "dashboards" / "ingest.yml"
DASHBOARD = ROOT / "config" / "grafana" / "dashboards" / "ingest.json"

# Series Prometheus makes itself; every other name a query uses must come from the service.
PROMETHEUS_OWN_SERIES = {"up"}
METRIC_NAME = re.compile(r"\b(ingest_[a-z0-9_]+)\b")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict)
    return data


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def dashboard_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    panels: list[dict[str, Any]] = []
    for panel in board["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard_panels(board)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERT_RULES)["groups"] for rule in group["rules"]]


def concrete(expr: str, rate_interval: str = "15s") -> str:
    """A dashboard query as Grafana sends it with every instance selected."""
    return expr.replace("$__rate_interval", rate_interval).replace("$instance", ".*")


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def exposed_names(metrics_text: str) -> set[str]:
    """Sample names as Prometheus stores them (counters with _total, histograms per suffix)."""
    return {s.name for f in text_string_to_metric_families(metrics_text) for s in f.samples}


def exposed_names_of_service_metrics() -> set[str]:
    """What /metrics exposes, read from the service's own Metrics object without a server."""
    from prometheus_client import generate_latest

    from ingest.metrics import Metrics

    metrics = Metrics(["consumer-1"])
    return exposed_names(generate_latest(metrics.registry).decode("utf-8"))


def free_port() -> int:
    """A port free right now on 127.0.0.1 (a subprocess cannot hand back the port 0 it bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers(url: str) -> bool:
    try:
        return request(url, timeout_s=1.0).status == 200
    except OSError:
        return False


def ingest_command(*args: str) -> list[str]:
    """The real CLI, run by the same interpreter as the tests."""
    return [sys.executable, "-m", "ingest", *args]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without INGEST_* settings that would leak into a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env.update(extra)
    return env


def metrics_text(service_url: str) -> str:
    reply = request(f"{service_url}/metrics")
    assert reply.status == 200, f"/metrics answered {reply.status}"
    return reply.body.decode("utf-8")


def port_of(url: str) -> int:
    port = urllib.parse.urlsplit(url).port
    assert port is not None, url
    return port


def prometheus_api(base_url: str, path: str, **params: str) -> Any:
    """GET /api/v1/<path> of a Prometheus server; its `data`, or the test fails saying why."""
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    answer = request(f"{base_url}/api/v1/{path}{query}")
    reply = json.loads(answer.body)
    ok = answer.status == 200 and reply["status"] == "success"
    assert ok, f"{path} {params}: {answer.status} {answer.body[:500]!r}"
    return reply["data"]


def tracked_copy(into: Path) -> Path:
    """What a fresh clone holds: the repository's tracked files (modes kept), and nothing else."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for relative in filter(None, listed.decode().split("\0")):
        source = ROOT / relative
        if source.is_file():
            (into / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / relative)
    return into
