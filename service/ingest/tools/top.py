"""`ingest top`: a live terminal view of a running service, read from its /metrics.

Client side only, like `push`: it imports nothing from the server modules, so it watches any
ingest it can reach over HTTP. Rates need two scrapes, so `--once` also scrapes twice,
`interval_s` apart, and prints the second scrape with the rates between the two.

This module is the refresh loop; the scrape and its figures are scrape.py, the screen screen.py.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import TextIO

from ingest.errors import ClientError

# Each `X as X` is a re-export: top's tests know Histogram and parse_snapshot as top's.
from ingest.tools.scrape import Histogram as Histogram
from ingest.tools.scrape import Snapshot, fetch
from ingest.tools.scrape import parse_snapshot as parse_snapshot
from ingest.tools.screen import render

EXIT_OK = 0
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def run(
    *,
    url: str,
    once: bool,
    interval_s: float = 1.0,
    out: TextIO,
    stop: threading.Event | None = None,
    token: str | None = None,
    cacert: str | None = None,
) -> int:
    """Show the service at `url` until Ctrl-C (or `stop` is set); with `once`, one screen.

    Raises ClientError when the first scrape fails. After that, a failed scrape keeps the last
    screen with a warning and tries again next interval: a restarting service comes back.
    """
    metrics_url = _metrics_url(url)
    stop = stop or threading.Event()
    timeout_s = max(1.0, min(interval_s, 5.0))
    tty = out.isatty()
    try:
        current, current_at = fetch(metrics_url, timeout_s, token, cacert), time.monotonic()
        previous: Snapshot | None = None
        previous_at = current_at
        if once:
            if stop.wait(interval_s):
                return EXIT_OK
            previous, previous_at = current, current_at
            current, current_at = fetch(metrics_url, timeout_s, token, cacert), time.monotonic()
            out.write(_header(metrics_url, None) + render(current, previous, current_at - previous_at))
            out.flush()
            return EXIT_OK
        warning = ""
        while True:
            screen = _header(metrics_url, interval_s) + warning
            screen += render(current, previous, current_at - previous_at)
            out.write((CLEAR_SCREEN if tty else "\n") + screen)
            out.flush()
            if stop.wait(interval_s):
                return EXIT_OK
            try:
                latest, latest_at = fetch(metrics_url, timeout_s, token, cacert), time.monotonic()
            except ClientError as exc:
                warning = f"!! {exc} (retrying)\n"
                continue
            warning = ""
            previous, previous_at = current, current_at
            current, current_at = latest, latest_at
    except KeyboardInterrupt:
        out.write("\ningest top: stopped.\n")
        out.flush()
        return EXIT_OK


def _metrics_url(url: str) -> str:
    base = url if "://" in url else f"http://{url}"
    base = base.rstrip("/")
    return base if base.endswith("/metrics") else f"{base}/metrics"


def _header(metrics_url: str, interval_s: float | None) -> str:
    when = datetime.now().strftime("%H:%M:%S")
    every = f"every {interval_s:g}s, Ctrl-C to quit" if interval_s is not None else "one snapshot"
    return f"ingest top  {metrics_url}  {when}  ({every})\n\n"
