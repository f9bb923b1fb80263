"""`ingest stream init` and `ingest stream status` against a real three-node cluster, and the
start check of `serve`/`write`: one line and exit 1 when the stream is missing or wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support.nats_cluster import NatsCluster, Node
from support.waiting import wait_until


def ingest(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingest", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def test_init_creates_then_leaves_then_updates(nats_cluster: NatsCluster) -> None:
    first = ingest("stream", "init", "--buffer", nats_cluster.urls, "--max-bytes", "1000000")
    assert first.returncode == 0, first.stderr
    assert "stream INGEST: created" in first.stdout and "consumer writers: created" in first.stdout
    again = ingest("stream", "init", "--buffer", nats_cluster.urls, "--max-bytes", "1000000")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == ["stream INGEST: unchanged", "consumer writers: unchanged"]
    changed = ingest("stream", "init", "--buffer", nats_cluster.urls, "--max-bytes", "2000000", "--ack-wait", "5")
    assert changed.returncode == 0, changed.stderr
    assert "stream INGEST: updated (max_bytes is 1000000, expected 2000000)" in changed.stdout
    assert "consumer writers: updated (ack_wait is 60000000000, expected 5000000000)" in changed.stdout

    status = ingest("stream", "status", "--buffer", nats_cluster.urls)
    assert status.returncode == 0, status.stderr
    lines = dict(line.split(":", 1) for line in status.stdout.splitlines()[1:])
    assert lines["  messages"].strip() == "0 (each one or more whole requests)"
    assert lines["  bytes"].strip().startswith("0 of 2000000")
    assert lines["  replicas current"].strip() == "3 of 3"
    assert lines["  leader"].strip() in {"n1", "n2", "n3"}


def test_status_of_a_missing_stream_says_to_init(nats_cluster: NatsCluster) -> None:
    status = ingest("stream", "status", "--buffer", nats_cluster.urls)
    assert status.returncode == 1
    assert status.stderr.strip() == "ingest: error: stream INGEST does not exist: run `ingest stream init`"


def test_serve_refuses_a_missing_stream_in_one_line(nats_cluster: NatsCluster, sqlite_url: str) -> None:
    serve = ingest("serve", "--port", "0", "--db", sqlite_url, "--buffer", nats_cluster.urls)
    assert serve.returncode == 1
    assert serve.stderr.strip().splitlines()[-1] == (
        "ingest: error: stream INGEST does not exist: run `ingest stream init`")


def test_write_refuses_a_stream_too_small_for_the_body(nats_cluster: NatsCluster, sqlite_url: str) -> None:
    assert ingest("stream", "init", "--buffer", nats_cluster.urls, "--max-body-bytes", "1000").returncode == 0
    write = ingest("write", "--port", "0", "--db", sqlite_url, "--buffer", nats_cluster.urls)
    assert write.returncode == 1
    assert write.stderr.strip().splitlines()[-1] == (
        "ingest: error: stream INGEST is not as expected (max_msg_size is 66536, less than --max-body-bytes plus "
        "headers (1114112)): run `ingest stream init`")


def test_serve_refuses_servers_whose_max_payload_is_below_the_body_limit(tmp_path: Path, sqlite_url: str) -> None:
    """A standalone server with max_payload 1 MiB: less than the default --max-body-bytes (1 MiB)
    plus 64 KiB of header room, so a whole request might not fit in one message."""
    node = Node("small", tmp_path / "nats", None, max_payload=1024 * 1024)
    try:
        node.start()
        wait_until(node.healthy, 30, "the standalone NATS server healthy")
        serve = ingest("serve", "--port", "0", "--db", sqlite_url, "--buffer", node.url)
    finally:
        node.kill()
    assert serve.returncode == 1
    assert serve.stderr.strip().splitlines()[-1] == (
        "ingest: error: NATS max_payload is 1048576 bytes, less than --max-body-bytes plus headers (1114112): "
        "raise max_payload on the servers (e.g. 2MB) or lower --max-body-bytes")


def test_buffer_with_spool_is_a_settings_error(tmp_path) -> None:
    serve = ingest("serve", "--buffer", "nats://127.0.0.1:1", "--spool", str(tmp_path / "spool.db"))
    assert serve.returncode == 2
    assert "give --buffer nats://... or --spool, not both" in serve.stderr


def test_init_waits_for_a_cluster_that_has_not_formed(nats_cluster: NatsCluster) -> None:
    """Seen under Docker: compose started `stream init` once the servers answered their health
    check, before the cluster could do JetStream work, and init exited 1 (taking the stack's
    `up` with it). Here two of three servers are down: no quorum, so no meta leader."""
    for name in ("n2", "n3"):
        nats_cluster.node(name).stop()
    init = subprocess.Popen([sys.executable, "-m", "ingest", "stream", "init", "--buffer", nats_cluster.urls],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert init.stderr is not None
        first = init.stderr.readline()  # blocks until init says something (or ends)
        assert "the cluster is not ready yet, trying again" in first, first
        for name in ("n2", "n3"):
            nats_cluster.node(name).start()
        out, err = init.communicate(timeout=90)
    finally:
        init.kill()
    assert init.returncode == 0, err
    assert "stream INGEST: created" in out and "consumer writers: created" in out
