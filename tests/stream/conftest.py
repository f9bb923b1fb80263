"""Fixtures of the stream buffer's tests: a real three-node NATS JetStream cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.nats_cluster import NatsCluster, init_stream


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three nodes with sync_interval always, formed (a meta leader), killed afterwards."""
    cluster = NatsCluster(tmp_path / "nats")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def stream_ready(nats_cluster: NatsCluster) -> NatsCluster:
    """The cluster with the stream and its consumer made (`ingest stream init`, its defaults but a
    short ack wait: a redelivery takes seconds, not a minute)."""
    init_stream(nats_cluster)
    return nats_cluster

