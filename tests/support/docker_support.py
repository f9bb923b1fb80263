"""A Docker engine and the images the stack tests need, on machines that cannot pull any image.

`engine()` starts dockerd when nothing answers and returns a handle that stops only what it
started. `prepare()` runs the user's stack/prepare.py, the one home of the stand-in images
(stack/standins/) and of building the ingest image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.stack_support import COMPOSE_FILE, ROOT

PREPARE = ROOT / "stack" / "prepare.py"
ENGINE_START_TIMEOUT_S = 60.0
BUILD_TIMEOUT_S = 900.0


class DockerUnavailable(AssertionError):
    """Raised as a test failure, never a skip: the stack tests must run where the README says."""


def docker(*args: str, timeout_s: float = 120.0, check: bool = True,
           env: dict[str, str] | None = None, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout_s, env=env, input=input_text,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def _engine_answers() -> bool:
    try:
        return docker("info", "--format", "{{.ServerVersion}}", timeout_s=15, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


# ---------------------------------------------------------------- the engine


@dataclass
class Engine:
    """The running engine; `started` is the dockerd this test run launched, if it had to."""

    started: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def stop(self) -> None:
        if self.started is None:
            return
        self.started.terminate()
        try:
            self.started.wait(60)
        except subprocess.TimeoutExpired:
            self.started.kill()
            self.started.wait(10)


def engine(log_dir: Path) -> Engine:
    if shutil.which("docker") is None:
        raise DockerUnavailable("the docker client is missing: run `bash tests/run`, which installs docker.io")
    if _engine_answers():
        return Engine()
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise DockerUnavailable("no Docker engine answers and dockerd is missing: run `bash tests/run`")
    log = log_dir / "dockerd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [dockerd, "--storage-driver=overlay2"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    handle = Engine(process, log)
    deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
    while not _engine_answers():
        if process.poll() is not None or time.monotonic() > deadline:
            handle.stop()
            tail = log.read_text(errors="replace")[-2000:]
            raise DockerUnavailable(f"dockerd did not come up (exit {process.returncode}):\n{tail}")
        time.sleep(0.5)  # the poll interval of a condition with a deadline
    return handle


# ---------------------------------------------------------------- images


def prepare(env: dict[str, str], *args: str) -> str:
    """The user's own command, stack/prepare.py: stand-ins where no registry answers, and the
    ingest image, built once. What it printed, or the test fails with what it said."""
    done = subprocess.run([sys.executable, str(PREPARE), *args], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT_S, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise DockerUnavailable(f"stack/prepare.py exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


# ---------------------------------------------------------------- a compose project


@dataclass
class Stack:
    """One compose project of the real docker-compose.yml; host ports come from variables."""

    project: str
    ports: dict[str, int]
    env: dict[str, str] = field(default_factory=dict)
    cached_token: str | None = field(default=None, repr=False)  # the tokens volume's load token
    before: EngineContents | None = None  # what the engine held before the project's first command

    def __post_init__(self) -> None:
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("INGEST_")},
            "STACK_PROXY_PORT": f"127.0.0.1:{self.ports['proxy']}",
            "STACK_PROMETHEUS_PORT": f"127.0.0.1:{self.ports['prometheus']}",
            "STACK_GRAFANA_PORT": f"127.0.0.1:{self.ports['grafana']}",
        }

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy']}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['prometheus']}"

    def compose(self, *args: str, timeout_s: float = 300.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            return docker("compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args,
                          timeout_s=timeout_s, check=check, env=self.env)
        except AssertionError as exc:
            if "up" not in args:
                raise
            # An `up` that failed says only which service did: what its containers printed says why.
            files = [arg for n, arg in enumerate(args) if n and args[n - 1] == "-f"]
            logs = docker("compose", "-p", self.project, "-f", str(COMPOSE_FILE), *(f for path in files
                          for f in ("-f", path)), "logs", "--no-color", "--tail", "20", check=False, env=self.env)
            raise AssertionError(f"{exc}\nthe containers' last lines:\n{logs.stdout}{logs.stderr}") from None

    def containers(self, service: str, *, all_states: bool = False) -> list[str]:
        args = ["ps", "-q", *(["-a"] if all_states else []), service]
        return self.compose(*args).stdout.split()

    def inspect(self, container: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(docker("inspect", container).stdout)
        return data[0]

    def token(self) -> str:
        """The load client's token, as the stack's `tokens` service wrote it into its volume."""
        if self.cached_token is None:
            self.cached_token = self.compose(
                "exec", "-T", "ingest", "cat", "/var/lib/ingest/tokens/load.token", timeout_s=60
            ).stdout.strip()
        return self.cached_token

    def sql(self, query: str) -> str:
        """One query through psql inside the postgres container, as the compose user."""
        return self.compose("exec", "-T", "postgres", "psql", "-U", "ingest", "-d", "ingest", "-tAq",
                            "-v", "ON_ERROR_STOP=1", "-c", query, timeout_s=60).stdout.strip()

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, volumes and networks of this project still on the engine."""
        label = f"label=com.docker.compose.project={self.project}"
        return {
            "containers": docker("ps", "-aq", "--filter", label).stdout.split(),
            "volumes": docker("volume", "ls", "-q", "--filter", label).stdout.split(),
            "networks": docker("network", "ls", "-q", "--filter", label).stdout.split(),
        }


@dataclass
class EngineContents:
    """Every container and volume the engine has, whoever made them; with the compose project
    each belongs to, where a label or a mounting container says."""

    containers: dict[str, str]  # id -> project ("" when none)
    volumes: dict[str, str]  # name -> project ("" when none)

    def left_since(self, before: EngineContents | None, project: str) -> dict[str, list[str]]:
        """What is here now and was not before, except what another project (a parallel test
        run on a shared engine) visibly owns: an unlabelled, unmounted volume counts as left."""
        old = before or EngineContents({}, {})
        ours = {"", project}
        return {
            "containers": sorted(c for c, p in self.containers.items() if c not in old.containers and p in ours),
            "volumes": sorted(v for v, p in self.volumes.items() if v not in old.volumes and p in ours),
        }


def engine_contents() -> EngineContents:
    containers: dict[str, str] = {}
    volumes: dict[str, str] = {}
    for line in docker("ps", "-a", "--no-trunc", "--format",
                       '{{.ID}} {{.Label "com.docker.compose.project"}}').stdout.splitlines():
        container, _, project = line.partition(" ")
        containers[container] = project.strip()
    volume_format = '{{.Name}} {{.Label "com.docker.compose.project"}}'
    for line in docker("volume", "ls", "--format", volume_format).stdout.splitlines():
        name, _, project = line.partition(" ")
        volumes[name] = project.strip()
    if containers:  # an anonymous volume belongs to the project of a container that mounts it
        for item in json.loads(docker("inspect", *containers).stdout):
            for mount in item.get("Mounts", []):
                if mount.get("Type") == "volume" and not volumes.get(mount["Name"]):
                    volumes[mount["Name"]] = containers[item["Id"]]
    return EngineContents(containers, volumes)


@contextmanager
def running_container(*args: str) -> Iterator[str]:
    """`docker run -d` with the given arguments; the container is removed afterwards."""
    container = docker("run", "-d", *args).stdout.strip()
    try:
        yield container
    finally:
        docker("rm", "-f", "-v", container, check=False)
