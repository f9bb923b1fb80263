"""The README's stack section, followed as a newcomer would on a machine without a registry
(issue 19): its commands, in order, in a fresh copy of the repository, from an engine that holds
none of the images the stack needs.

"None of the images" without taking them from under other users of a shared engine: the run gets
a namespace of its own (STACK_IMAGE_PREFIX), so prepare.py finds nothing and builds everything,
the debootstrapped base included; the namespace's images are removed afterwards. The README's
8080 and 9090 become free ports (STACK_*_PORT), as it tells a user with those ports taken to do.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.docker_support import docker, engine, engine_contents
from support.httpclient import request
from support.stack_support import ROOT, answers, clean_env, free_port, tracked_copy
from support.waiting import wait_until

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]


def _readme_stack_commands() -> list[str]:
    """The README's one block of `docker compose` commands, each line without its comment."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```$", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    (block,) = [b for b in blocks if "docker compose" in b]
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.strip().splitlines()]


def _images(prefix: str) -> list[str]:
    listed = docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    return [image for image in listed if image.startswith(prefix)]


@pytest.fixture
def namespace(tmp_path: Path) -> Iterator[str]:
    """An engine (started if none answers) and an image namespace nothing uses yet, removed after."""
    handle = engine(tmp_path)
    prefix = f"ingest-newcomer-{uuid.uuid4().hex[:8]}/"
    try:
        yield prefix
    finally:
        images = _images(prefix)
        if images:
            docker("rmi", "-f", *images, timeout_s=300, check=False)
        handle.stop()


def test_the_readme_stack_commands_run_in_order_from_an_engine_without_the_images(
    namespace: str, tmp_path: Path,
) -> None:
    commands = _readme_stack_commands()
    assert [c.split()[:3] for c in commands][:2] == [["python3", "stack/prepare.py"], ["docker", "compose", "up"]]
    project = f"newcomer{uuid.uuid4().hex[:8]}"
    copy = tracked_copy(tmp_path / project)  # compose names the project after the folder
    proxy, prometheus = free_port(), free_port()
    env = clean_env(STACK_IMAGE_PREFIX=namespace, STACK_PROXY_PORT=f"127.0.0.1:{proxy}",
                    STACK_PROMETHEUS_PORT=f"127.0.0.1:{prometheus}")
    assert _images(namespace) == []
    before = engine_contents()

    def run(command: str) -> str:
        started = time.monotonic()
        done = subprocess.run(["bash", "-c", command], cwd=copy, env=env, capture_output=True, text=True,
                              timeout=800)
        print(f"{time.monotonic() - started:6.1f} s  {command}")
        assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    def stored() -> int:
        count = run("docker compose exec -T postgres psql -U ingest -d ingest -tAc 'SELECT count(*) FROM messages'")
        return int(count.strip())

    try:
        prepared, up, load, down = commands
        said = run(prepared)
        assert "stand-in built" in said and "base built by debootstrap" in said and "ready in" in said, said
        assert set(_images(namespace)) >= {f"{namespace}ingest:local", f"{namespace}postgres:16-alpine"}
        run(up)
        assert answers(f"http://127.0.0.1:{proxy}/healthz")
        again = run(prepared)  # a second run, the stack up: its own ports are no obstacle
        assert "stand-in present and current" in again and "built" not in again.replace("built from the", ""), again
        # The README's alerts page on the stand-in Prometheus, which has no /alerts.
        assert request(f"http://127.0.0.1:{prometheus}/classic/alerts").status == 200
        run(load)
        wait_until(lambda: stored() > 0, 120, "the load generator's messages in Postgres")
        run(down)
    finally:
        subprocess.run(["docker", "compose", "--profile", "*", "down", "-v", "-t", "5"], cwd=copy, env=env,
                       capture_output=True, timeout=300, check=False)
    assert engine_contents().left_since(before, project) == {"containers": [], "volumes": []}
