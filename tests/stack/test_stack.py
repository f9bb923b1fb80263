"""Static checks of the container stack: what can be known from its files alone, fast.
test_docker_stack.py runs the stack under Docker; test_stack_e2e.py runs its parts without it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import click
import jsonschema
import pytest
import yaml
from click.core import ParameterSource
from click.testing import CliRunner

from ingest.cli import main as cli_main
from support.stack_support import (
    ALERT_RULES,
    DASHBOARD,
    DOCKERFILE,
    DOCKERIGNORE,
    GRAFANA_DATASOURCES,
    GRAFANA_PROVIDERS,
    NGINX_CONFIG,
    PROMETHEUS_CONFIG,
    PROMETHEUS_OWN_SERIES,
    ROOT,
    alert_rules,
    clean_env,
    compose,
    dashboard,
    dashboard_panels,
    dashboard_queries,
    exposed_names_of_service_metrics,
    load_yaml,
    metric_names,
)

# The Compose Specification's JSON schema, as shipped inside docker-compose 1.29.2's wheel
# (compose/config/compose_spec.json). tests/run downloads that wheel into .cache/ and names it in
# INGEST_TEST_COMPOSE_WHEEL; the hash pins the schema the file is checked against.
COMPOSE_SCHEMA_ENV = "INGEST_TEST_COMPOSE_WHEEL"
COMPOSE_WHEEL_NAME = "docker_compose-1.29.2-py2.py3-none-any.whl"
COMPOSE_WHEEL_SHA256 = "8d5589373b35c8d3b1c8c1182c6e4a4ff14bffa3dd0b605fcd08f73c94cef809"
COMPOSE_SCHEMA_MEMBER = "compose/config/compose_spec.json"
DEFAULT_WHEEL = ROOT / ".cache" / COMPOSE_WHEEL_NAME

HOST_PORTS = {8080, 9090, 3000}
DATASOURCE_UID = "prometheus"


# ---------------------------------------------------------------- helpers


def _compose_schema() -> dict[str, Any]:
    wheel = Path(os.environ.get(COMPOSE_SCHEMA_ENV, DEFAULT_WHEEL))
    if not wheel.is_file():
        pytest.fail(
            f"the Compose schema wheel is missing at {wheel}; get it with\n"
            f"  python -m pip download --no-deps --only-binary=:all: docker-compose==1.29.2 -d {wheel.parent}\n"
            f"or point {COMPOSE_SCHEMA_ENV} at the downloaded .whl"
        )
    data = wheel.read_bytes()
    assert hashlib.sha256(data).hexdigest() == COMPOSE_WHEEL_SHA256, f"{wheel} is not docker-compose 1.29.2"
    with zipfile.ZipFile(wheel) as archive:
        schema: dict[str, Any] = json.loads(archive.read(COMPOSE_SCHEMA_MEMBER))
    return schema


def _validate(document: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    # The file declares draft 2019-09 under a URI spelling jsonschema does not recognise
    # ("http://json-schema.org/draft/2019-09/schema#"), so name the draft rather than guess it.
    assert "2019-09" in schema["$schema"]
    jsonschema.Draft201909Validator.check_schema(schema)
    validator = jsonschema.Draft201909Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def _with_defaults(value: str) -> str:
    """Compose's `${VAR:-default}` and `${VAR-default}` interpolation with no variable set."""
    return re.sub(r"\$\{[A-Z_]+:?-([^}]*)\}", r"\1", value)


def _interpolated(node: Any) -> Any:
    """The file as compose reads it with no variable set: defaults in, whole numbers as numbers
    (`replicas: ${INGEST_REPLICAS:-1}` is an integer once interpolated)."""
    if isinstance(node, dict):
        return {key: _interpolated(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolated(value) for value in node]
    if isinstance(node, str) and "${" in node:
        value = _with_defaults(node)
        return int(value) if value.isdigit() and re.fullmatch(r"\$\{[A-Z_]+:?-\d+\}", node) else value
    return node


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    return services


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _resolve(argv: list[str]) -> tuple[click.Command, list[str], str]:
    """Walk `ingest sub sub ...` down the real click group to the command that runs."""
    assert argv[0] == "ingest", f"not an ingest command line: {argv}"
    command: click.Command = cli_main
    rest = argv[1:]
    path = "ingest"
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        command, path = command.commands[rest[0]], f"{path} {rest[0]}"
        rest = rest[1:]
    assert not isinstance(command, click.Group), f"{argv} names a group, not a command"
    return command, rest, path


def _parse(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> click.Context:
    """Parse like the container would: its command line plus its environment, nothing else."""
    for key in [k for k in os.environ if k.startswith("INGEST_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    command, rest, path = _resolve(argv)
    return command.make_context(path, rest)


def _push_command_lines(script: str) -> list[list[str]]:
    """The `ingest push ...` invocations inside the load service's shell loop."""
    found = []
    for line in script.splitlines():
        if "ingest push" not in line:
            continue  # e.g. the trap, whose quoted command holds a `;`
        words = shlex.split(re.split(r"\|\||&&|;|&", line)[0])
        if "ingest" in words and words[words.index("ingest") + 1 : words.index("ingest") + 2] == ["push"]:
            found.append(words[words.index("ingest") :])
    return found


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    instructions = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _dockerignore_excludes(path: str, rules: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for rule in rules:
        negated = rule.startswith("!")
        pattern = rule[1:] if negated else rule
        regex = re.escape(pattern.strip("/"))
        regex = regex.replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: apt-get install -y prometheus (Debian's package ships it)")
    return path


def _run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def _bind_sources(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host source, container target) of every bind mount; named volumes are skipped."""
    binds = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                binds.append((volume["source"], volume["target"]))
            continue
        if ":" not in volume:
            continue  # an anonymous volume: a container path only
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/", "~")):
            binds.append((source, target))
    return binds


def _container_path_to_host(service: dict[str, Any], container_path: str) -> Path | None:
    for source, target in _bind_sources(service):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return ROOT / source / container_path[len(target) :].lstrip("/")
    return None


# ---------------------------------------------------------------- docker-compose.yml


def test_compose_file_validates_against_the_compose_specification() -> None:
    schema = _compose_schema()
    assert _validate(_interpolated(compose()), schema) == []


def test_the_compose_schema_check_is_not_vacuous() -> None:
    """The same validator must refuse a service with an unknown key and a boolean env value."""
    schema = _compose_schema()
    broken = compose()
    broken["services"]["ingest"]["replicas_typo"] = 3
    broken["services"]["ingest"]["environment"]["INGEST_ACK"] = True
    errors = _validate(broken, schema)
    assert any("replicas_typo" in e for e in errors), errors
    assert any("INGEST_ACK" in e for e in errors), errors


def test_compose_has_the_stack_and_the_load_generator_only_under_its_profile() -> None:
    services = _services()
    assert {"postgres", "ingest", "prometheus", "grafana", "load", "proxy"} <= set(services)
    assert services["load"]["profiles"] == ["load"]
    # Grafana too, off unless COMPOSE_PROFILES names it: no command fails on its pull (issue 19)
    assert services["grafana"]["profiles"] == ["grafana"]
    assert sorted(name for name, s in services.items() if "profiles" in s) == ["grafana", "load"]


def test_only_8080_9090_3000_are_published_and_ingest_can_scale() -> None:
    published = set()
    for name, service in _services().items():
        assert "container_name" not in service, f"{name}: a fixed container name breaks --scale"
        for port in service.get("ports", []):
            spec = _with_defaults(str(port["published"] if isinstance(port, dict) else port))
            host_part = spec.rsplit(":", 1)[0] if ":" in spec else spec
            published.add(int(host_part.split(":")[-1]))
    assert published == HOST_PORTS
    ingest = _services()["ingest"]
    assert "ports" not in ingest, "replicas must not publish host ports; the proxy does"


def test_startup_order_waits_for_health_and_migrations() -> None:
    services = _services()
    # Over TCP: the socket answers during the image's init phase already (test_docker_stack).
    assert services["postgres"]["healthcheck"]["test"][1].startswith("pg_isready -h 127.0.0.1 ")
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["ingest"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["proxy"]["depends_on"]["ingest"]["condition"] == "service_healthy"


def test_every_service_running_ingest_has_an_init_to_pass_signals_on() -> None:
    for name, service in _services().items():
        if service.get("image") == "ingest:local":
            assert service.get("init") is True, f"{name}: without init, a SIGTERM during start-up is lost"


def test_build_contexts_and_bind_sources_exist() -> None:
    for name, service in _services().items():
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
            assert (context / dockerfile).is_file(), f"{name}: no {dockerfile} in {context}"
        for source, _target in _bind_sources(service):
            assert (ROOT / source).exists(), f"{name}: bind source {source} does not exist"
        declared = set(compose().get("volumes") or {})
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and ":" not in volume:
                continue  # anonymous
            named = volume.get("source") if isinstance(volume, dict) else volume.split(":")[0]
            if named and not named.startswith((".", "/", "~")):
                assert named in declared, f"{name}: named volume {named} is not declared"


def test_ingest_command_line_parses_with_the_real_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    services = _services()
    for name in ("ingest", "migrate"):
        service = services[name]
        ctx = _parse(service["command"], _environment(service), monkeypatch)
        assert ctx.params.get("db_url", "").startswith("postgresql+psycopg://"), name
    serve = _parse(services["ingest"]["command"], _environment(services["ingest"]), monkeypatch)
    assert serve.command.name == "serve"
    assert serve.params["migrate"] is False, "replicas must not race to migrate; the migrate service does"
    assert serve.params["host"] == "0.0.0.0"


def test_every_ingest_variable_in_compose_is_a_setting_the_command_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, service in _services().items():
        env = {k: v for k, v in _environment(service).items() if k.startswith("INGEST_")}
        if not env:
            continue
        ctx = _parse(service["command"], env, monkeypatch)
        by_envvar = {p.envvar: p.name for p in ctx.command.params if isinstance(p.envvar, str)}
        for var in env:
            assert var in by_envvar, f"{name}: {var} is not a setting of {ctx.command_path}"
            source = ctx.get_parameter_source(by_envvar[var])
            assert source is ParameterSource.ENVIRONMENT, f"{name}: {var} was not read"


def test_the_ingest_settings_in_compose_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ingest config show` with the container's flags and env builds and validates Settings."""
    service = _services()["ingest"]
    _command, rest, _path = _resolve(service["command"])
    for key in [k for k in os.environ if k.startswith("INGEST_")]:
        monkeypatch.delenv(key)
    result = CliRunner().invoke(cli_main, ["config", "show", *rest], env=_environment(service))
    assert result.exit_code == 0, result.output
    assert 'db_url = "postgresql+psycopg://ingest:***@postgres:5432/ingest"' in result.output
    assert "queue_size = 10000" in result.output


def test_load_profile_pushes_through_the_proxy_with_the_real_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    services = _services()
    load = services["load"]
    script = load["command"][-1]
    pushes = _push_command_lines(script)
    assert pushes, f"no `ingest push` in the load command: {script!r}"
    listen = re.search(r"listen\s+(\d+);", NGINX_CONFIG.read_text())
    assert listen is not None
    queue_size = int(_environment(services["ingest"])["INGEST_QUEUE_SIZE"])
    rounds = [_parse(argv, {}, monkeypatch).params for argv in pushes]
    for params in rounds:
        assert params["url"] == f"http://proxy:{listen.group(1)}"
    steady = [p for p in rounds if p["rate"]]
    bursts = [p for p in rounds if not p["rate"]]
    assert steady, "the load needs a steady, rate-limited round"
    # Far more in flight than the queue holds, for longer than a scrape at ~100k msg/s stored.
    assert bursts and all(p["concurrency"] * p["batch"] >= 4 * queue_size for p in bursts), bursts
    assert all(p["count"] >= 100 * queue_size for p in bursts), bursts


def test_proxy_forwards_to_the_ingest_service_port() -> None:
    conf = NGINX_CONFIG.read_text(encoding="utf-8")
    upstream = re.search(r"set \$ingest_upstream http://([\w-]+):(\d+);", conf)
    assert upstream is not None
    host, port = upstream.groups()
    assert host == "ingest"
    assert port == _environment(_services()["ingest"])["INGEST_PORT"]
    assert "resolver 127.0.0.11" in conf, "without Docker's DNS resolver, scaled replicas are not found"
    listen = re.search(r"listen\s+(\d+);", conf)
    assert listen is not None
    assert [_with_defaults(p) for p in _services()["proxy"]["ports"]] == [f"8080:{listen.group(1)}"]
    for setting in ("proxy_connect_timeout 1s;", "valid=1s"):
        assert setting in conf, f"without {setting!r} a scale-down stalls requests (test_docker_stack)"


def test_nginx_accepts_the_proxy_config(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).is_file():
        pytest.fail("nginx is missing: apt-get install -y nginx (Debian's package; only its binary is used)")
    checked = subprocess.run(
        [nginx, "-t", "-q", "-c", str(NGINX_CONFIG), "-e", "stderr", "-g", f"pid {tmp_path / 'nginx.pid'};"],
        capture_output=True, text=True, timeout=30,
    )
    assert checked.returncode == 0, checked.stderr


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_installs_the_package_as_a_non_root_user_with_a_readyz_healthcheck() -> None:
    instructions = _dockerfile_instructions()
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert froms and all(f.startswith("${IMAGE_PREFIX}python:3.11-slim") for f in froms)
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert "pip install ." in runs
    assert "curl" not in runs
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the final stage must not run as root"
    healthchecks = [rest for keyword, rest in instructions if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    snippet = _healthcheck_snippet()
    compile(snippet, "<HEALTHCHECK>", "exec")
    assert "/readyz" in snippet


def _healthcheck_snippet() -> str:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", text, re.MULTILINE)
    assert match is not None, "HEALTHCHECK must use the exec form CMD [...]"
    argv = json.loads(match.group(1))
    assert argv[:2] == ["python", "-c"]
    snippet: str = argv[2]
    return snippet


def _dockerignore_rules() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    rules = _dockerignore_rules()
    copies = [rest for keyword, rest in _dockerfile_instructions() if keyword == "COPY" and "--from" not in rest]
    assert copies
    for copy in copies:
        *sources, _destination = copy.split()
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: missing"
            files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
            assert files, f"COPY {source}: nothing to copy"
            for file in files:
                relative = file.relative_to(ROOT).as_posix()
                assert not _dockerignore_excludes(relative, rules), f".dockerignore drops {relative}"
    # Nothing the image does not need: tests, config and .git stay out of the context.
    for outside in ("tests/test_stack.py", ".git/HEAD", "config/prometheus/alerts.yml"):
        assert _dockerignore_excludes(outside, rules), f"{outside} would be sent to the builder"


def _build_context(into: Path) -> Path:
    """What `docker build` would have after its COPY lines: the COPY sources minus .dockerignore."""
    rules = _dockerignore_rules()
    copies = [rest for keyword, rest in _dockerfile_instructions() if keyword == "COPY" and "--from" not in rest]
    for copy in copies:
        *sources, _destination = copy.split()
        for source in sources:
            path = ROOT / source
            for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
                relative = file.relative_to(ROOT).as_posix()
                if not _dockerignore_excludes(relative, rules):
                    (into / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, into / relative)
    return into


def test_the_image_install_step_rehearsed_builds_a_package_that_migrates(tmp_path: Path) -> None:
    """No Docker engine here, so rehearse the image's `pip install .` on the same files: build a
    wheel from exactly the build context, install it apart from the checkout, and migrate."""
    context = _build_context(tmp_path / "context")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(context)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("ingest-*.whl")
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    env = {**clean_env(), "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import ingest; print(ingest.__file__)"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )
    assert where.stdout.strip() == str(site / "ingest" / "__init__.py"), where.stdout + where.stderr
    upgrade = subprocess.run(
        [sys.executable, "-m", "ingest", "db", "upgrade", "--db", f"sqlite:///{tmp_path / 'image.db'}"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )
    assert upgrade.returncode == 0, upgrade.stderr
    assert upgrade.stdout.strip().endswith("empty -> 0005")


def test_dockerignore_matcher_follows_dockers_rules() -> None:
    rules = ["*", "!service", "**/__pycache__"]
    assert _dockerignore_excludes("tests/x.py", rules)
    assert not _dockerignore_excludes("service/ingest/cli.py", rules)
    assert _dockerignore_excludes("service/ingest/__pycache__/cli.cpython-311.pyc", rules)


# ---------------------------------------------------------------- Prometheus


def test_promtool_check_config_passes() -> None:
    result = _run_promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules_passes() -> None:
    result = _run_promtool("check", "rules", str(ALERT_RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_discovers_every_ingest_replica_by_dns() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["global"]["scrape_interval"] == "5s"
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "ingest"]
    (dns,) = job["dns_sd_configs"]
    assert dns["names"] == ["ingest"] and dns["type"] == "A"
    assert str(dns["port"]) == _environment(_services()["ingest"])["INGEST_PORT"]
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_CONFIG.parent / rule_file).is_file()
    # The compose service mounts this folder where --config.file points.
    prometheus = _services()["prometheus"]
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    host_path = _container_path_to_host(prometheus, config_flag.split("=", 1)[1])
    assert host_path is not None and host_path.resolve() == PROMETHEUS_CONFIG.resolve()


REQUIRED_ALERTS = {
    "IngestQueueNearlyFull",
    "IngestNotStoring",
    "IngestConsumerDied",
    "IngestConsumerRestartsClimbing",
    "IngestDbRetriesClimbing",
    "IngestRejectingQueueFull",
    "IngestStreamNearlyFull",
    "IngestStreamBacklogGrowing",
    "IngestStreamReplicasBehind",
}


def test_alert_rules_cover_the_issue_and_tell_the_operator_what_to_look_at() -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert names >= REQUIRED_ALERTS
    for rule in rules:
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), rule["alert"]
        assert len(annotations.get("description", "")) > 80, f"{rule['alert']}: say what to look at"
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
    by_name = {rule["alert"]: rule for rule in rules}
    assert by_name["IngestQueueNearlyFull"]["for"] == "1m"
    assert "0.8" in by_name["IngestQueueNearlyFull"]["expr"]


def test_alert_rules_fire_when_they_should(tmp_path: Path) -> None:
    """`promtool test rules` on synthetic series: each alert fires on its symptom, not before.

    The rules are copied without annotations, whose wording is checked above; promtool would
    otherwise demand every rendered annotation verbatim.
    """
    rules = load_yaml(ALERT_RULES)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    i1 = 'instance="i1", job="ingest"'

    def fires(name: str, at: str, labels: dict[str, str]) -> dict[str, Any]:
        return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": labels}]}

    def silent(name: str, at: str) -> dict[str, Any]:
        return {"eval_time": at, "alertname": name, "exp_alerts": []}

    page = {"instance": "i1", "job": "ingest", "severity": "page"}
    ticket = {"instance": "i1", "job": "ingest", "severity": "ticket"}
    cases = [
        (  # 90% full: pending at 30 s, firing once it has lasted a minute
            [("ingest_queue_depth", "9000x20"), ("ingest_queue_capacity", "10000x20")],
            [silent("IngestQueueNearlyFull", "30s"), fires("IngestQueueNearlyFull", "2m", page)],
        ),
        (  # 70% full never fires
            [("ingest_queue_depth", "7000x20"), ("ingest_queue_capacity", "10000x20")],
            [silent("IngestQueueNearlyFull", "4m")],
        ),
        (  # received keeps growing, stored is stuck
            [("ingest_messages_received_total", "0+100x20"), ("ingest_messages_stored_total", "500x20"),
             ("ingest_consumers_configured", "4x20")],
            [silent("IngestNotStoring", "1m"), fires("IngestNotStoring", "3m", page)],
        ),
        (  # a stream buffer's listener only (no consumers) stores nothing by design
            [("ingest_messages_received_total", "0+100x20"), ("ingest_messages_stored_total", "0x20"),
             ("ingest_consumers_configured", "0x20")],
            [silent("IngestNotStoring", "4m")],
        ),
        (  # both grow: healthy
            [("ingest_messages_received_total", "0+100x20"), ("ingest_messages_stored_total", "0+100x20")],
            [silent("IngestNotStoring", "4m")],
        ),
        (  # idle: nothing received, nothing stored, no alert
            [("ingest_messages_received_total", "500x20"), ("ingest_messages_stored_total", "500x20")],
            [silent("IngestNotStoring", "4m")],
        ),
        (
            [('ingest_thread_errors_total{thread="consumer-2", ' + i1 + "}", "0 0 0 1x10")],
            [silent("IngestConsumerDied", "30s"),
             fires("IngestConsumerDied", "2m", {**ticket, "thread": "consumer-2"})],
        ),
        (
            [("ingest_consumers_alive", "3x20"), ("ingest_consumers_configured", "4x20")],
            [fires("IngestConsumersDown", "2m", page)],
        ),
        (
            [("ingest_consumers_alive", "4x20"), ("ingest_consumers_configured", "4x20")],
            [silent("IngestConsumersDown", "4m")],
        ),
        (  # a restart every 15 s
            [("ingest_consumer_restarts_total", "0+1x20")],
            [fires("IngestConsumerRestartsClimbing", "4m", page)],
        ),
        (  # one restart is not a climb
            [("ingest_consumer_restarts_total", "0 1x20")],
            [silent("IngestConsumerRestartsClimbing", "4m")],
        ),
        (  # 10 retries every 15 s for minutes
            [("ingest_db_retries_total", "0+10x20")],
            [silent("IngestDbRetriesClimbing", "1m"), fires("IngestDbRetriesClimbing", "4m", ticket)],
        ),
        (  # 20 msg/s turned away for queue_full (the 5m rate passes 10/s after about 2.5m, then
            # `for` 2m); a flood of invalid ones on another instance does not count
            [('ingest_messages_rejected_total{reason="queue_full", ' + i1 + "}", "0+300x40"),
             ('ingest_messages_rejected_total{reason="invalid", instance="i2", job="ingest"}', "0+3000x40")],
            [silent("IngestRejectingQueueFull", "2m"),
             fires("IngestRejectingQueueFull", "6m", {"instance": "i1", "severity": "ticket"})],
        ),
        (  # 90 % of the spool for minutes; a service without a spool (capacity 0) never fires
            [("ingest_spool_bytes", "900x40"), ("ingest_spool_capacity_bytes", "1000x40"),
             ('ingest_spool_bytes{instance="i2", job="ingest"}', "0x40"),
             ('ingest_spool_capacity_bytes{instance="i2", job="ingest"}', "0x40")],
            [silent("IngestSpoolNearlyFull", "4m"), fires("IngestSpoolNearlyFull", "6m", page)],
        ),
        (  # an orphaned spool file no replica adopts, counted by both replicas: one alert after 5 min
            [("ingest_spool_orphaned_messages", "300x40"),
             ('ingest_spool_orphaned_messages{instance="i2", job="ingest"}', "300x40")],
            [silent("IngestSpoolOrphaned", "4m"), fires("IngestSpoolOrphaned", "6m", {"severity": "page"})],
        ),
        (  # adopted within seconds, as it should be: no alert
            [("ingest_spool_orphaned_messages", "300 0x40")],
            [silent("IngestSpoolOrphaned", "8m")],
        ),
        (
            [("ingest_messages_dead_lettered_total", "0 0 0 5x10")],
            [fires("IngestDeadLetters", "2m", ticket)],
        ),
        (  # two letters nobody replays for a day, counted by two replicas: one alert
            [("ingest_dead_letters_waiting", "2x6000"), ('ingest_dead_letters_waiting{instance="i2", job="ingest"}',
                                                       "2x6000")],
            [silent("IngestDeadLettersWaiting", "23h"),
             fires("IngestDeadLettersWaiting", "25h", {"severity": "ticket"})],
        ),
        (  # replayed within the day: no alert
            [("ingest_dead_letters_waiting", "2x3000 0x3000")],
            [silent("IngestDeadLettersWaiting", "25h")],
        ),
        (  # the stream 90 % full, seen by a listener and a writer alike: one alert; 70 % never fires
            [("ingest_stream_bytes", "900x20"), ("ingest_stream_capacity_bytes", "1000x20"),
             ('ingest_stream_bytes{instance="i2", job="ingest"}', "900x20"),
             ('ingest_stream_capacity_bytes{instance="i2", job="ingest"}', "1000x20")],
            [silent("IngestStreamNearlyFull", "30s"),
             fires("IngestStreamNearlyFull", "2m", {"job": "ingest", "severity": "page"})],
        ),
        (
            [("ingest_stream_bytes", "700x20"), ("ingest_stream_capacity_bytes", "1000x20")],
            [silent("IngestStreamNearlyFull", "4m")],
        ),
        (  # with the memory buffer (capacity 0) it never fires
            [("ingest_stream_bytes", "0x20"), ("ingest_stream_capacity_bytes", "0x20")],
            [silent("IngestStreamNearlyFull", "4m")],
        ),
        (  # ten more requests every 15 s for 15 minutes: fires once the trend has lasted 5 minutes
            [("ingest_stream_messages", "0+10x60")],
            [silent("IngestStreamBacklogGrowing", "4m"),
             fires("IngestStreamBacklogGrowing", "12m", {"job": "ingest", "severity": "ticket"})],
        ),
        (  # a steady backlog, or one draining, does not
            [("ingest_stream_messages", "500x60")],
            [silent("IngestStreamBacklogGrowing", "14m")],
        ),
        (
            [("ingest_stream_replicas_current", "2x20"), ("ingest_stream_replicas", "3x20")],
            [silent("IngestStreamReplicasBehind", "30s"),
             fires("IngestStreamReplicasBehind", "2m", {"job": "ingest", "severity": "page"})],
        ),
        (
            [("ingest_stream_replicas_current", "3x20"), ("ingest_stream_replicas", "3x20")],
            [silent("IngestStreamReplicasBehind", "4m")],
        ),
        (
            [("ingest_messages_lost_total", "0x4 12x10")],
            [silent("IngestMessagesLost", "30s"), fires("IngestMessagesLost", "2m", page)],
        ),
        (
            [("up", "0x20")],
            [silent("IngestDown", "30s"), fires("IngestDown", "2m", page),
             silent("IngestNoReplicas", "2m")],
        ),
        (  # every replica gone from DNS: `up` vanishes instead of reading 0
            [("up", "1x4 stale"), ("ingest_queue_depth", "0x20")],
            [silent("IngestDown", "3m"), silent("IngestNoReplicas", "1m30s"),
             fires("IngestNoReplicas", "3m", {"job": "ingest", "severity": "page"})],
        ),
        (  # three replicas, one crashes and leaves DNS; a steady three never fires
            [('up{instance="i1", job="ingest"}', "1x20"), ('up{instance="i2", job="ingest"}', "1x20"),
             ('up{instance="i3", job="ingest"}', "1x6 stale")],
            [silent("IngestReplicasLost", "1m"), fires("IngestReplicasLost", "4m", {"severity": "ticket"}),
             silent("IngestNoReplicas", "4m")],
        ),
        (  # a third replica that lived 45 s, between two minute marks, then crashed (a subquery
            # that sampled once a minute never saw three)
            [('up{instance="i1", job="ingest"}', "1x20"), ('up{instance="i2", job="ingest"}', "1x20"),
             ('up{instance="i3", job="ingest"}', "_ 1 1 1 stale")],
            [silent("IngestReplicasLost", "30s"), fires("IngestReplicasLost", "3m", {"severity": "ticket"})],
        ),
    ]
    tests = []
    for series, alerts in cases:
        input_series = [
            {"series": name if "{" in name else f"{name}{{{i1}}}", "values": values} for name, values in series
        ]
        tests.append({"interval": "15s", "input_series": input_series, "alert_rule_test": alerts})
    (tmp_path / "tests.yml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "15s", "tests": tests})
    )
    result = _run_promtool("test", "rules", "tests.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {alert["alertname"] for _series, alerts in cases for alert in alerts}
    assert tested == {rule["alert"] for rule in alert_rules()}, "every alert needs a case here"


# ---------------------------------------------------------------- Grafana


def test_grafana_datasource_is_the_compose_prometheus_with_a_fixed_uid() -> None:
    (datasource,) = load_yaml(GRAFANA_DATASOURCES)["datasources"]
    assert datasource["uid"] == DATASOURCE_UID
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in _services()


def test_grafana_provisioning_is_mounted_and_the_home_dashboard_exists() -> None:
    grafana = _services()["grafana"]
    env = _environment(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    for provisioned in (GRAFANA_DATASOURCES, GRAFANA_PROVIDERS):
        container = f"/etc/grafana/provisioning/{provisioned.parent.name}/{provisioned.name}"
        host = _container_path_to_host(grafana, container)
        assert host is not None and host.resolve() == provisioned.resolve(), container
    (provider,) = load_yaml(GRAFANA_PROVIDERS)["providers"]
    folder = _container_path_to_host(grafana, provider["options"]["path"])
    assert folder is not None and (folder / DASHBOARD.name).resolve() == DASHBOARD.resolve()
    home = _container_path_to_host(grafana, env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home is not None and home.resolve() == DASHBOARD.resolve()


def test_every_panel_uses_the_provisioned_datasource() -> None:
    board = dashboard()
    for panel in dashboard_panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == DATASOURCE_UID


def test_dashboard_has_units_thresholds_an_instance_variable_and_a_sane_layout() -> None:
    board = dashboard()
    (instance,) = [v for v in board["templating"]["list"] if v["name"] == "instance"]
    assert instance["includeAll"] and instance["multi"] and instance["allValue"] == ".*"
    ids = [panel["id"] for panel in dashboard_panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    taken: set[tuple[int, int]] = set()
    for panel in dashboard_panels(board):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        columns, rows = range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])
        cells = {(x, y) for x in columns for y in rows}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        if panel["type"] == "row":
            continue
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults.get("unit"), f"{panel['title']}: no unit"
        assert defaults["thresholds"]["steps"], f"{panel['title']}: no thresholds"
        assert panel.get("description"), f"{panel['title']}: say what the panel shows"
    # Every metric selector is filtered by the variable, or the variable would lie.
    for title, expr in dashboard_queries(board):
        for match in re.finditer(r"\b(ingest_[a-z0-9_]+)", expr):
            assert expr[match.end() :].startswith('{instance=~"$instance"}'), f"{title}: {match.group(1)}"


def _panel_exprs() -> list[tuple[str, str]]:
    board = dashboard()
    return [
        (panel["title"], " ".join(t["expr"] for t in panel.get("targets", [])))
        for panel in dashboard_panels(board)
    ]


@pytest.mark.parametrize(
    ("topic", "must_contain"),
    [
        ("messages received/stored per second",
         ["rate(ingest_messages_received_total", "rate(ingest_messages_stored_total"]),
        ("queue depth against capacity", ["ingest_queue_depth", "ingest_queue_capacity"]),
        ("latency p50/p95/p99", ["histogram_quantile(0.5,", "histogram_quantile(0.95,", "histogram_quantile(0.99,",
                                 "ingest_message_latency_seconds_bucket"]),
        ("batch size", ["ingest_batch_size_"]),
        ("DB write time", ["ingest_db_write_seconds_bucket"]),
        ("pool in use / waiting against size",
         ["ingest_db_pool_in_use", "ingest_db_pool_waiting", "ingest_db_pool_size"]),
        ("rejections by reason", ["by (reason)", "ingest_messages_rejected_total"]),
        ("consumers alive and thread errors", ["ingest_consumers_alive", "ingest_thread_errors_total"]),
        ("DB retries", ["ingest_db_retries_total"]),
        ("HTTP responses by code", ["by (code)", "ingest_http_requests_total"]),
        ("per instance", ["sum by (instance)"]),
    ],
)
def test_dashboard_has_a_panel_for(topic: str, must_contain: list[str]) -> None:
    matching = [title for title, exprs in _panel_exprs() if all(s in exprs for s in must_contain)]
    assert matching, f"no panel shows {topic}"


def test_every_metric_in_dashboard_and_rules_is_exported_by_the_service() -> None:
    exported = exposed_names_of_service_metrics()
    used = {name for _title, expr in dashboard_queries(dashboard()) for name in metric_names(expr)}
    used |= {name for rule in alert_rules() for name in metric_names(rule["expr"])}
    assert used, "no metric found: the extraction is broken"
    assert used - exported == set()
    for variable in dashboard()["templating"]["list"]:
        assert metric_names(variable["definition"]) <= exported
    assert all(
        set(re.findall(r"\b([a-z_]+)\{", rule["expr"])) <= exported | PROMETHEUS_OWN_SERIES
        for rule in alert_rules()
    )
