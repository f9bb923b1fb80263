"""Reading what a service did: rows in its database, samples in its registry."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Engine

from ingest.service import Service
from support.httpclient import request


def count_rows(engine: Engine, table: str = "messages") -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def metric(service: Service, name: str, labels: dict[str, str] | None = None) -> float:
    value = service.metrics.registry.get_sample_value(name, labels or {})
    assert value is not None, f"no sample {name}{labels or ''}"
    return value


def metric_text(url: str, name: str) -> float:
    """An unlabelled sample off a running process's /metrics (another process: no registry)."""
    for line in request(f"{url}/metrics").body.decode().splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")
