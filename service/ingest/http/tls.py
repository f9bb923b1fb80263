"""TLS for the listener: a server context from a certificate, its key, and optionally a client CA.

Built before anything starts, so an unreadable file or a key that does not match its certificate
is one line and exit 2, like any other bad setting. With a client CA, every client must present
a certificate that CA signed (mutual TLS).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from ingest.errors import ConfigError


def server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for setting, path in (("tls_cert", cert), ("tls_key", key), ("tls_client_ca", client_ca)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{setting} {path}: no such file")
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(f"tls_cert {cert} and tls_key {key} do not go together: {exc.reason or exc}") from None
    except OSError as exc:
        raise ConfigError(f"tls_cert {cert} / tls_key {key}: cannot read: {exc.strerror}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"tls_client_ca {client_ca}: not a CA certificate file: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
