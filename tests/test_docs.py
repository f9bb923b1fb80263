"""The README and the documentation site (docs/, mkdocs.yml) say what the code does.

Tables that name code are checked against it: the API page's routes against the OpenAPI document,
the configuration table against `Settings`, the metrics table against the registry, the alerts
page against the rules. `mkdocs build --strict` must pass (and fail on a broken link), and the
README's and the getting-started page's commands run in a fresh copy of the repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from markdown.extensions.toc import slugify

from support.stack_support import clean_env, free_port, tracked_copy
from support.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MKDOCS = Path(sys.executable).parent / "mkdocs"
SET_UP = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/ingest serve"
TEST_COMMAND = "bash tests/run"


def page(name: str) -> str:
    return (DOCS / name).read_text()


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```$", text, flags=re.M | re.S)


def table_after(text: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header line is `header`, as lists of cells."""
    lines = text.split(f"\n{header}\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert re.fullmatch(r"\|(---\|)+", lines[0]), lines[0]
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in lines[1:]]


def headings(text: str) -> set[str]:
    """The anchors mkdocs (Python-Markdown's toc) and GitHub make of a page's headings."""
    without_code = re.sub(r"^```.*?^```$", "", text, flags=re.M | re.S)
    return {slugify(title, "-") for title in re.findall(r"^#+ (.+)$", without_code, flags=re.M)}


# --- the set-up commands and the first messages, exactly as a newcomer reads them ---------------


@pytest.mark.parametrize("name", ["README.md", "docs/getting-started.md"])
def test_the_two_set_up_commands_are_given_exactly(name: str) -> None:
    blocks = [block.strip() for block in code_blocks((ROOT / name).read_text())]
    assert SET_UP in blocks and TEST_COMMAND in blocks
    assert (ROOT / "tests" / "run").is_file()
    assert subprocess.run(["bash", "-n", str(ROOT / "tests" / "run")]).returncode == 0


def _exchanges(block: str) -> list[tuple[str, str | None]]:
    """(command, the reply shown under it) for each `curl` line of a block; continuations joined."""
    lines = block.replace("\\\n", " ").splitlines()
    found: list[tuple[str, str | None]] = []
    for index, line in enumerate(lines):
        if line.startswith("curl "):
            shown = lines[index + 1] if index + 1 < len(lines) and lines[index + 1].startswith("{") else None
            found.append((line, shown))
    return found


def _first_message_blocks(text: str) -> list[str]:
    return [block for block in code_blocks(text) if block.startswith("curl -X POST localhost:8080/messages")]


@pytest.mark.timeout(900)
def test_readme_and_getting_started_commands_run_in_a_fresh_directory(tmp_path: Path) -> None:
    """The set-up command, word for word, in a copy of the tracked files; then the first messages
    of the README and of the getting-started page, against it, with the replies they show."""
    fresh = tracked_copy(tmp_path / "fresh")
    port = free_port()
    # The command as given; only the port moves (INGEST_PORT), so a busy 8080 cannot fail the test.
    env = clean_env(INGEST_PORT=str(port))
    env.pop("VIRTUAL_ENV", None)
    log = (tmp_path / "serve.log").open("w")
    serving = subprocess.Popen(
        ["bash", "-c", SET_UP], cwd=fresh, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        def ready() -> bool:
            assert serving.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            probe = subprocess.run(["curl", "-sf", f"localhost:{port}/readyz"], capture_output=True)
            return probe.returncode == 0

        wait_until(ready, timeout_s=600, what="the set-up command's service to be ready")
        assert (fresh / "ingest.db").is_file()  # the embedded SQLite file, as the page says
        blocks = _first_message_blocks((ROOT / "README.md").read_text())
        blocks += _first_message_blocks(page("getting-started.md"))
        assert len(blocks) == 2
        exchanges = [(index, *exchange) for index, block in enumerate(blocks) for exchange in _exchanges(block)]
        assert len(exchanges) == 5 and all(shown for _block, _command, shown in exchanges)
        ids: dict[tuple[int, str], str] = {}  # a block's example request ids -> the ones the service made
        for block, as_shown, shown in exchanges:
            command = as_shown.replace("localhost:8080", f"localhost:{port}")
            for (in_block, example), actual in ids.items():
                if in_block == block:
                    command = command.replace(example, actual)
            done = subprocess.run(["bash", "-c", command], cwd=fresh, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, (command, done.stderr)
            reply, expected = json.loads(done.stdout), json.loads(shown or "")
            expected["request"] = ids.setdefault((block, expected["request"]), reply["request"])
            if "pending" in expected and reply != expected:  # stored a moment after the 202
                wait_until(
                    lambda command=command, expected=expected: json.loads(subprocess.run(
                        ["bash", "-c", command], capture_output=True, text=True, timeout=60).stdout) == expected,
                    timeout_s=30, what=f"the receipt to read {expected}",
                )
                continue
            assert reply == expected, command
    finally:
        os.killpg(serving.pid, signal.SIGTERM)
        code = serving.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]


def test_the_stack_commands_name_the_compose_files_services_and_profiles() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    profiles = {profile for service in compose["services"].values() for profile in service.get("profiles", [])}
    stack_page = "\n".join(code_blocks(page("operating/stack.md")))
    readme = [block for block in code_blocks((ROOT / "README.md").read_text()) if "docker compose" in block]
    assert len(readme) == 1 and len(readme[0].strip().splitlines()) == 4
    for line in readme[0].strip().splitlines():
        assert line in stack_page, line  # the README's four commands are the stack page's
    for command in re.findall(r"^docker compose [^#\n]*", stack_page + readme[0], flags=re.M):
        for profile in re.findall(r"--profile (\S+)", command):
            assert profile in profiles | {"'*'"}, command  # '*': every profile
        for service in re.findall(r"--scale (\w+)=", command):
            assert service in compose["services"], command


# --- tables that name code -----------------------------------------------------------------------


def test_api_page_routes_and_statuses_are_the_openapi_documents() -> None:
    document = json.loads((ROOT / "service" / "ingest" / "http" / "openapi.json").read_text())
    operations = {
        f"{method.upper()} {path}": set(operation["responses"])
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    }
    text = page("api.md")
    shown = {row[0].strip("`"): {code.strip() for code in row[1].split(",")}
             for row in table_after(text, "| route | statuses | |")}
    assert shown == operations
    details = text.split("## Requests and answers", 1)[1]
    for route, statuses in operations.items():
        assert route.split(" ", 1)[1] in details, route
        for status in statuses:
            assert f"`{status}" in details, f"{route} {status} is not explained"


def test_configuration_page_table_names_every_setting_by_flag_and_env_var() -> None:
    """The table lists the same (flag, env var) pairs as the Settings fields, no more, no fewer."""
    from ingest.config import setting_specs

    text = page("operating/configuration.md")
    table = text.split("\n| flag | env | default | |\n|---|---|---|---|\n", 1)[1].split("\n\n", 1)[0]
    documented = set()
    for row in table.splitlines():
        flags, envvars = (cell.split(",") for cell in row.strip("|").split("|")[:2])
        for flag, envvar in zip(flags, envvars, strict=True):
            documented.add((flag.strip(" `").split("/")[0], envvar.strip(" `")))
    assert documented == {(spec.flag.split("/")[0], spec.envvar) for spec in setting_specs()}


def test_metrics_page_names_every_registered_metric_with_its_type_and_labels() -> None:
    from ingest.metrics import Metrics

    registered = {}
    for family in Metrics(["consumer-1"]).registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = {label for sample in family.samples for label in sample.labels if label != "le"}
        registered[name] = (family.type, labels)
    documented = {}
    for row in table_after(page("operating/metrics.md"), "| metric | type | |"):
        for spelled in re.findall(r"`([a-z_]+)(?:\{([a-z_,]+)\})?`", row[0]):
            name, labels = spelled
            documented[name] = (row[1], set(filter(None, labels.split(","))))
    assert documented == registered


def test_alerts_page_has_every_rule_with_its_severity_meaning_and_what_to_do() -> None:
    rules = yaml.safe_load((ROOT / "config" / "prometheus" / "alerts.yml").read_text())
    expected = {rule["alert"]: rule["labels"]["severity"] for group in rules["groups"] for rule in group["rules"]}
    text = page("operating/alerts.md")
    assert {row[0].strip("`"): row[2] for row in table_after(text, "| alert | fires when | severity |")} == expected
    sections = dict(re.findall(r"^### (\w+)\n\n(.*?)(?=^#|\Z)", text, flags=re.M | re.S))
    assert set(sections) == set(expected)
    for name, body in sections.items():
        assert "**Means**:" in body and "**Do**:" in body, name


# --- links, paths and the strict build -----------------------------------------------------------


def test_readme_links_lead_to_files_and_headings_that_exist() -> None:
    links = re.findall(r"\]\(([^)]+)\)", (ROOT / "README.md").read_text())
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert len(local) >= 15
    for link in local:
        target, _, anchor = link.partition("#")
        assert (ROOT / target).exists(), link
        if anchor:
            assert anchor in headings((ROOT / target).read_text()), link
    for page_name in ("docs/api.md", "docs/guarantees.md", "docs/operating/alerts.md",
                      "docs/how-it-works/threads.md", "docs/performance/benchmark.md"):
        assert any(link.split("#")[0] == page_name for link in local), f"one click from the README to {page_name}"


def test_every_repository_path_the_docs_name_exists() -> None:
    prefixes = ("service/", "tests/", "bench/", "config/", "migrations/", "docs/")
    named = set()
    for path in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        for span in re.findall(r"`([^`\s]+)`", path.read_text()):
            if span.startswith(prefixes) and not re.search(r"[<>*{}]|\.\.\.", span):
                named.add(span.rstrip(".,;:"))
    assert len(named) > 40
    missing = sorted(name for name in named if not (ROOT / name).exists())
    assert missing == []


def _build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def test_the_site_builds_strictly_with_every_page_in_the_nav(tmp_path: Path) -> None:
    built = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert built.returncode == 0, built.stderr
    pages = sorted(p.relative_to(DOCS).with_suffix(".html").as_posix() for p in DOCS.rglob("*.md"))
    assert all((tmp_path / "site" / name).is_file() for name in pages)


@pytest.mark.parametrize("breakage", [
    "[a page that is not there](nowhere.md)",
    "[a heading that is not there](api.md#no-such-heading)",
    "ORPHAN",
])
def test_the_strict_build_fails_on_a_broken_link_or_a_page_outside_the_nav(tmp_path: Path, breakage: str) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(DOCS, copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    if breakage == "ORPHAN":
        (copy / "docs" / "orphan.md").write_text("# Not in the nav\n")
    else:
        index = copy / "docs" / "index.md"
        index.write_text(index.read_text() + f"\n{breakage}\n")
    built = _build(copy / "mkdocs.yml", tmp_path / "site")
    assert built.returncode != 0, built.stderr
