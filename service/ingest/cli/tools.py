"""Client tools that talk to a running service over HTTP: push (load) and top (a live view)."""

from __future__ import annotations

import sys
from typing import Any

import click

from ingest.cli.common import EXIT_FAILURE
from ingest.vocabulary import ACK_MODES


@click.command("push")
@click.option("--url", default="http://127.0.0.1:8080", show_default=True, help="Service to push to.")
@click.option("--count", type=int, default=10_000, show_default=True, help="Messages to send.")
@click.option("--batch", type=int, default=100, show_default=True, help="Messages a request (NDJSON when > 1).")
@click.option("--concurrency", type=int, default=16, show_default=True, help="Requests in flight.")
@click.option("--rate", type=float, default=None, help="Messages a second (default: as fast as possible).")
@click.option("--burst", type=int, default=0, show_default=True, help="Extra messages sent at once each second.")
@click.option("--ack", type=click.Choice(ACK_MODES), default="enqueue", show_default=True)
@click.option("--gzip/--no-gzip", "gzip", default=False, help="Compress request bodies.")
@click.option("--token", envvar="INGEST_TOKEN", show_envvar=True, default=None,
              help="Bearer token, for a service started with --auth-tokens.")
@click.option("--cacert", default=None, help="A CA file to trust for an https:// URL (default: the system's).")
@click.option("--idempotent/--no-idempotent", "idempotent", default=False,
              help="Send an Idempotency-Key with every request, so that no retry stores a message twice; "
                   "requests that time out are then retried too.")
@click.option("--receipts", is_flag=True,
              help="At the end, ask GET /requests/{id} for a sample of 100 requests until they are stored "
                   "(up to --receipt-timeout); exit 1 unless all are.")
@click.option("--receipt-timeout", "receipt_timeout_s", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, help="Seconds --receipts waits for pending messages.")
def push(**values: Any) -> None:
    """Push generated messages at a running service; exit 1 if any was not acknowledged."""
    from ingest.tools import push as pusher
    from ingest.tools.report import progress_bar

    options = pusher.PushOptions(**values)
    progress = progress_bar(sys.stderr) if sys.stderr.isatty() else None
    try:
        summary = pusher.run(options, progress=progress)
    finally:
        if progress is not None:
            progress.close()  # end the bar's line even when the run failed
    click.echo(summary.format())
    if not summary.ok:
        sys.exit(EXIT_FAILURE)


@click.command("top")
@click.option("--url", default="http://127.0.0.1:8080", show_default=True, help="Service to watch.")
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--token", envvar="INGEST_METRICS_TOKEN", show_envvar=True, default=None,
              help="Bearer token for /metrics, for a service started with --metrics-token.")
@click.option("--cacert", default=None, help="A CA file to trust for an https:// URL (default: the system's).")
def top(url: str, once: bool, interval_s: float, token: str | None, cacert: str | None) -> None:
    """A live view of a running service, read from its /metrics."""
    from ingest.tools import top as viewer

    sys.exit(viewer.run(url=url, once=once, interval_s=interval_s, out=sys.stdout, token=token, cacert=cacert))
