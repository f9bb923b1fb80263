"""Who may push: named clients and their bearer tokens, read from a file, reloadable.

The file has one `name:token` a line; blank lines and `#` comments are allowed. A malformed line
or a name or token given twice is a ConfigError naming the line. Tokens are compared in constant
time, against every token, so neither timing nor the order of the file tells which one matched;
they never appear in logs, metrics, errors or `config show`. Only client names label metrics.
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
from pathlib import Path

from ingest.errors import ConfigError
from ingest.metrics import ANONYMOUS

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TOKEN = re.compile(r"[\x21-\x7e]{16,512}")
UNKNOWN = "unknown"  # the one label for every request without a valid token


def load_tokens(path: Path) -> dict[str, str]:
    """name -> token, checked; every problem names the file and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"auth_tokens {path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"auth_tokens {path}: not UTF-8 text") from None
    tokens: dict[str, str] = {}
    seen_tokens: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, token = line.partition(":")
        where = f"auth_tokens {path}, line {number}"
        if not colon or not _NAME.fullmatch(name):
            raise ConfigError(f"{where}: expected name:token with a name of letters, digits, _ . - (1-64)")
        if not _TOKEN.fullmatch(token):
            raise ConfigError(f"{where}: the token of {name!r} must be 16 to 512 visible ASCII characters")
        if name in tokens:
            raise ConfigError(f"{where}: client {name!r} is named twice")
        if token in seen_tokens:
            raise ConfigError(f"{where}: the token of {name!r} is also another client's")
        if name in (UNKNOWN, ANONYMOUS):
            raise ConfigError(f"{where}: {name!r} is reserved for requests without a known client")
        tokens[name] = token
        seen_tokens.add(token)
    if not tokens:
        raise ConfigError(f"auth_tokens {path}: no client in the file")
    return tokens


class Tokens:
    """The current clients; `reload()` swaps them whole, or keeps them if the file is bad."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._clients = load_tokens(path)

    def __repr__(self) -> str:
        return f"Tokens({self.path}, {len(self._clients)} client(s))"  # never the tokens

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._clients)

    def client(self, authorization: str | None) -> str | None:
        """The client's name for an `Authorization: Bearer <token>` header, or None."""
        if authorization is None:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        presented = token.strip().encode()
        with self._lock:
            clients = list(self._clients.items())
        found = None
        for name, known in clients:  # no early exit: every request costs the same
            if hmac.compare_digest(presented, known.encode()):
                found = name
        return found

    def reload(self) -> bool:
        """Read the file again (SIGHUP); on any problem keep the old clients and say why."""
        try:
            clients = load_tokens(self.path)
        except ConfigError as exc:
            log.error("kept the previous %d client(s): %s", len(self._clients), exc)
            return False
        with self._lock:
            self._clients = clients
        log.info("auth_tokens %s reloaded: %d client(s)", self.path, len(clients))
        return True
