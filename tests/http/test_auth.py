"""Who may push: bearer tokens from a file, 401s, client labels, SIGHUP reloads, /metrics token.

Real services over real HTTP; the reload is a real SIGHUP to a real `ingest serve`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.errors import ConfigError
from ingest.http.auth import Tokens, load_tokens
from ingest.tools.push import PushOptions, run
from support.httpclient import request
from support.probes import metric
from support.serving import serving
from support.waiting import wait_until

ALICE = "alice-token-0123456789"
BOB = "bob-token-9876543210xyz"


def _tokens(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens"
    path.write_text(text)
    return path


def _push(url: str, token: str | None, query: str = "") -> int:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return request(f"{url}/messages{query}", "POST", json.dumps({"a": 1}).encode(), headers).status


# ---------------------------------------------------------------- the file


def test_a_token_file_with_comments_and_blank_lines(tmp_path) -> None:
    path = _tokens(tmp_path, f"# clients\n\nalice:{ALICE}\n  bob:{BOB}  \n")
    assert load_tokens(path) == {"alice": ALICE, "bob": BOB}
    tokens = Tokens(path)
    assert tokens.client(f"Bearer {BOB}") == "bob"
    assert tokens.client(f"bearer {ALICE}") == "alice"
    for wrong in (None, "", ALICE, f"Basic {ALICE}", f"Bearer {ALICE}x", "Bearer "):
        assert tokens.client(wrong) is None
    assert ALICE not in repr(tokens)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (f"alice {ALICE}\n", "line 1: expected name:token"),
        (f"# c\nalice:{ALICE}\nalice:{BOB}\n", "line 3: client 'alice' is named twice"),
        (f"alice:{ALICE}\nbob:{ALICE}\n", "line 2: the token of 'bob' is also another client's"),
        ("alice:short\n", "line 1: the token of 'alice' must be 16 to 512 visible ASCII characters"),
        (f"unknown:{ALICE}\n", "line 1: 'unknown' is reserved"),
        ("# nobody\n", "no client in the file"),
    ],
)
def test_a_bad_token_file_names_the_line(tmp_path, text, says) -> None:
    path = _tokens(tmp_path, text)
    with pytest.raises(ConfigError, match=says) as raised:
        load_tokens(path)
    assert ALICE not in str(raised.value) and BOB not in str(raised.value)


def test_serve_with_a_bad_token_file_exits_2_with_one_line(tmp_path) -> None:
    path = _tokens(tmp_path, f"alice:{ALICE}\nbroken\n")
    done = subprocess.run(
        [sys.executable, "-m", "ingest", "serve", "--port", "0", "--db", f"sqlite:///{tmp_path / 'x.db'}",
         "--auth-tokens", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"ingest: error: auth_tokens {path}, line 2: expected name:token "
                                                 "with a name of letters, digits, _ . - (1-64)"]


# ---------------------------------------------------------------- over HTTP


def test_without_a_valid_token_a_push_is_401_and_with_one_it_is_counted_by_name(make_service, tmp_path) -> None:
    service = make_service(auth_tokens=str(_tokens(tmp_path, f"alice:{ALICE}\nbob:{BOB}\n")))
    for token in (None, "not-a-token-at-all-xx"):
        reply = request(f"{service.url}/messages", "POST", b'{"a": 1}',
                        {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})})
        assert reply.status == 401
        assert reply.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in reply.json()["error"]
    assert _push(service.url, ALICE) == 202
    assert _push(service.url, BOB, "?ack=commit") == 201
    assert metric(service, "ingest_messages_received_total", {"client": "alice"}) == 1
    assert metric(service, "ingest_messages_received_total", {"client": "bob"}) == 1
    assert metric(service, "ingest_messages_rejected_total", {"reason": "unauthorized", "client": "unknown"}) == 2
    text = request(f"{service.url}/metrics").body.decode()
    assert ALICE not in text and BOB not in text
    assert request(f"{service.url}/healthz").status == 200  # health stays open
    assert request(f"{service.url}/readyz").status == 200


def test_a_metrics_token_protects_metrics_only(make_service) -> None:
    token = "metrics-token-0123456789"
    service = make_service(metrics_token=token)
    assert request(f"{service.url}/metrics").status == 401
    assert request(f"{service.url}/metrics", headers={"Authorization": "Bearer wrong-token-0000000"}).status == 401
    assert request(f"{service.url}/metrics", headers={"Authorization": f"Bearer {token}"}).status == 200
    assert request(f"{service.url}/readyz").status == 200
    assert _push(service.url, None) == 202  # no --auth-tokens: pushing stays open


def test_without_tokens_on_a_non_loopback_address_readyz_says_so(make_service, caplog) -> None:
    open_service = make_service(host="0.0.0.0")
    reply = request(f"http://127.0.0.1:{open_service.port}/readyz")
    assert reply.status == 200
    assert reply.json()["warning"] == "no --auth-tokens: anyone who can reach 0.0.0.0 may push messages"
    assert "no --auth-tokens" in caplog.text
    loopback = make_service()
    assert "warning" not in request(f"{loopback.url}/readyz").json()


def test_push_sends_its_token(make_service, tmp_path) -> None:
    service = make_service(auth_tokens=str(_tokens(tmp_path, f"alice:{ALICE}\n")))
    assert run(PushOptions(url=service.url, count=50, batch=10, token=ALICE)).acknowledged == 50
    refused = run(PushOptions(url=service.url, count=10, batch=10))
    assert refused.failed == 10 and any("HTTP 401" in error for error in refused.errors)


def test_sighup_reloads_the_tokens_and_a_bad_file_keeps_the_old_ones(tmp_path) -> None:
    path = _tokens(tmp_path, f"alice:{ALICE}\n")
    args = ["--db", f"sqlite:///{tmp_path / 'x.db'}", "--auth-tokens", str(path)]
    with serving(args) as proc:
        assert _push(proc.url, ALICE) == 202 and _push(proc.url, BOB) == 401
        path.write_text(f"bob:{BOB}\n")
        proc.process.send_signal(signal.SIGHUP)
        wait_until(lambda: _push(proc.url, BOB) == 202, 10, "bob's token to work after SIGHUP")
        assert _push(proc.url, ALICE) == 401
        path.write_text("bob has no colon\n")
        proc.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "kept the previous 1 client(s)" in "".join(proc.log), 10, "the bad file refused")
        assert _push(proc.url, BOB) == 202
        proc.process.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    log = "".join(proc.log)
    assert ALICE not in log and BOB not in log
