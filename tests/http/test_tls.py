"""HTTPS and mutual TLS with certificates made at test time (trustme), and a real TLS client."""

from __future__ import annotations

import http.client
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trustme


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_files(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert.private_key_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    return str(cert_path), str(key_path)


def _post(port: int, context: ssl.SSLContext) -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.request("POST", "/messages", b'{"tls": true}', {"Content-Type": "application/json"})
        return conn.getresponse().status
    finally:
        conn.close()


def _client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_https_serves_a_tls_client_and_refuses_plain_http(make_service, ca, server_files) -> None:
    cert, key = server_files
    service = make_service(tls_cert=cert, tls_key=key)
    assert service.url.startswith("https://")
    assert _post(service.port, _client_context(ca)) == 202
    plain = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain.request("GET", "/readyz")
        plain.getresponse()
    plain.close()
    untrusting = ssl.create_default_context()  # does not know the test CA
    with pytest.raises(ssl.SSLCertVerificationError):
        _post(service.port, untrusting)


def test_mutual_tls_needs_a_client_certificate_from_the_ca(make_service, ca, server_files, tmp_path) -> None:
    cert, key = server_files
    ca_path = tmp_path / "clients-ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    service = make_service(tls_cert=cert, tls_key=key, tls_client_ca=str(ca_path))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _post(service.port, _client_context(ca))
    with_cert = _client_context(ca)
    ca.issue_cert("client-a").configure_cert(with_cert)
    assert _post(service.port, with_cert) == 202
    stranger = _client_context(ca)
    trustme.CA().issue_cert("client-b").configure_cert(stranger)  # signed by another CA
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _post(service.port, stranger)


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingest", "serve", "--port", "0", *args],
                          capture_output=True, text=True, timeout=60)


def test_bad_tls_files_are_one_line_and_exit_2(ca, server_files, tmp_path) -> None:
    cert, key = server_files
    other_key = tmp_path / "other.key"
    ca.issue_cert("elsewhere").private_key_pem.write_to_path(str(other_key))
    cases = [
        (["--tls-cert", cert, "--tls-key", str(other_key)], "do not go together"),
        (["--tls-cert", cert, "--tls-key", str(tmp_path / "missing.key")], "missing.key: no such file"),
        (["--tls-cert", cert], "tls_cert and tls_key go together"),
        (["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", key], "not a CA certificate file"),
    ]
    for args, says in cases:
        done = _serve("--db", f"sqlite:///{tmp_path / 'x.db'}", *args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ingest: error: ") and says in lines[0], done.stderr


def test_push_trusts_the_ca_it_is_given(make_service, ca, server_files, tmp_path) -> None:
    from ingest.tools.push import PushOptions, run

    cert, key = server_files
    service = make_service(tls_cert=cert, tls_key=key)
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    summary = run(PushOptions(url=service.url, count=40, batch=10, cacert=str(ca_path)))
    assert summary.acknowledged == 40, summary.format()
    untrusted = subprocess.run(
        [sys.executable, "-m", "ingest", "push", "--url", service.url, "--count", "10", "--batch", "10"],
        capture_output=True, text=True, timeout=60,
    )
    assert untrusted.returncode == 1 and "certificate verify failed" in untrusted.stdout + untrusted.stderr


def test_top_reads_an_https_service_with_its_token(make_service, ca, server_files, tmp_path) -> None:
    cert, key = server_files
    token = "metrics-token-0123456789"
    service = make_service(tls_cert=cert, tls_key=key, metrics_token=token)
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    done = subprocess.run(
        [sys.executable, "-m", "ingest", "top", "--once", "--url", service.url, "--token", token,
         "--cacert", str(ca_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert service.url in done.stdout
