"""Soak: steady load with bursts for a long time; is memory bounded by the queue, not the traffic?

    python bench/soak.py [--messages 20000000] [--rate 60000] [--burst 30000] [--postgres URL]
                         [--serve "--spool /tmp/soak.spool"]

Starts a real `ingest serve` (its defaults, 4 consumers) on a Postgres database it creates and
drops, and runs `ingest push` against it: NDJSON batches of 100 at `--rate` messages/s plus
`--burst` more at once every second, until `--messages` are sent (push catches up with its
schedule when the service pushes back). Every `--every` seconds it reads the service's RSS and
/metrics, and prints a line: received, stored, queue depth, requests in flight, RSS. At the
end: RSS first/peak/last, the 503 share of the requests, and p50/p95/p99 of accepted ->
committed latency from the service's histogram (interpolated within buckets, as Prometheus'
histogram_quantile does). With a --spool among the --serve flags, each line also shows the
messages spooled and the spool file's size on disk (with its WAL): bounded by the backlog, not by
what was pushed. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from run import Served, scratch_database  # the benchmark's own helpers: python puts bench/ on the path

LATENCY = "ingest_message_latency_seconds"


@dataclass
class Sample:
    at_s: float
    rss_mib: float
    queue: float
    in_flight: float  # requests in the receipts ledger
    received: float
    stored: float
    responses: dict[str, float] = field(default_factory=dict)
    latency: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    spooled: float = 0.0  # messages in the spool
    spool_mib: float = 0.0  # the spool file and its WAL on disk


def scrape(url: str) -> dict[str, float]:
    """Every sample of /metrics, by its name and labels as written."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def spool_path(serve_flags: list[str]) -> Path | None:
    """The --spool file among the flags for ingest serve, if any."""
    for flag, value in itertools.pairwise(serve_flags):
        if flag == "--spool":
            return Path(value)
    return None


def on_disk_mib(path: Path | None) -> float:
    if path is None:
        return 0.0
    files = [path, path.with_name(path.name + "-wal")]
    return sum(f.stat().st_size for f in files if f.exists()) / 2**20


def sample(served: Served, started_s: float, spool: Path | None = None) -> Sample:
    metrics = scrape(served.url)
    rss = next(int(line.split()[1]) / 1024 for line in Path(f"/proc/{served.proc.pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    buckets = {}
    for name, value in metrics.items():
        if name.startswith(f"{LATENCY}_bucket"):
            le = name.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(le)] = value
    return Sample(
        at_s=time.monotonic() - started_s,
        rss_mib=rss,
        queue=metrics.get("ingest_queue_depth", 0.0),
        in_flight=metrics.get("ingest_requests_in_flight", 0.0),
        received=sum(v for k, v in metrics.items() if k.startswith("ingest_messages_received_total")),
        stored=metrics.get("ingest_messages_stored_total", 0.0),
        responses={k.split('code="', 1)[1].split('"', 1)[0]: v for k, v in metrics.items()
                   if k.startswith("ingest_http_requests_total{")},
        latency=buckets,
        spooled=metrics.get("ingest_spool_messages", 0.0),
        spool_mib=on_disk_mib(spool),
    )


def quantile(q: float, first: dict[float, float], last: dict[float, float]) -> float:
    """histogram_quantile over the increase between two scrapes of cumulative buckets."""
    bounds = sorted(last)
    counts = [last[b] - first.get(b, 0.0) for b in bounds]
    total = counts[-1]
    if total <= 0:
        return float("nan")
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower  # above the last finite bucket: its bound is all that is known
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000_000)
    parser.add_argument("--rate", type=float, default=60_000, help="steady messages/s")
    parser.add_argument("--burst", type=int, default=30_000, help="extra messages at once, every second")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--serve", default="", help='more flags for ingest serve, e.g. "--queue-size 2000 '
                        '--enqueue-timeout 0" to make bursts overflow the queue')
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test",
                        help="an admin URL; the soak creates and drops its own database")
    args = parser.parse_args()
    with scratch_database(args.postgres, "ingest_soak") as url:
        served = Served(url, shlex.split(args.serve))
        try:
            soak(served, args)
        finally:
            served.stop()


def soak(served: Served, args: argparse.Namespace) -> None:
    started_s = time.monotonic()
    pusher = subprocess.Popen(
        [sys.executable, "-m", "ingest", "push", "--url", served.url, "--count", str(args.messages), "--batch", "100",
         "--concurrency", str(args.concurrency), "--rate", str(args.rate), "--burst", str(args.burst)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    spool = spool_path(shlex.split(args.serve))
    samples = [sample(served, started_s, spool)]
    print(f"{'t (s)':>7} {'received':>12} {'stored':>12} {'queue':>7} {'requests':>8} {'RSS MiB':>8}"
          + (f" {'spooled':>9} {'spool MiB':>9}" if spool else ""))
    done = threading.Event()
    threading.Thread(target=lambda: (pusher.wait(), done.set()), name="push-wait", daemon=True).start()
    while True:
        finished = done.wait(args.every)
        now = sample(served, started_s, spool)
        samples.append(now)
        print(f"{now.at_s:7.0f} {now.received:12,.0f} {now.stored:12,.0f} {now.queue:7,.0f} {now.in_flight:8,.0f} "
              f"{now.rss_mib:8.1f}" + (f" {now.spooled:9,.0f} {now.spool_mib:9.1f}" if spool else ""), flush=True)
        if finished and now.stored >= now.received:
            break
    summary = pusher.stdout.read() if pusher.stdout else ""
    first, last = samples[0], samples[-1]
    responses = {code: last.responses.get(code, 0.0) - first.responses.get(code, 0.0) for code in last.responses}
    posts = responses.get("202", 0.0) + responses.get("503", 0.0)
    rss = [s.rss_mib for s in samples]
    print(f"\nmessages stored {last.stored:,.0f} in {last.at_s:.0f} s ({last.stored / last.at_s:,.0f} msgs/s)")
    print(f"RSS MiB: first {rss[0]:.1f}, peak {max(rss):.1f}, last {rss[-1]:.1f}")
    if spool:
        peak = max(samples, key=lambda s: s.spooled)
        print(f"spool: most messages spooled {peak.spooled:,.0f} (at {peak.at_s:.0f} s); on disk MiB: peak "
              f"{max(s.spool_mib for s in samples):.1f}, last {on_disk_mib(spool):.1f}")
    print(f"503 share: {responses.get('503', 0.0):,.0f} of {posts:,.0f} requests "
          f"({100 * responses.get('503', 0.0) / posts if posts else 0:.2f} %)")
    latency = ", ".join(f"p{round(q * 100)} {quantile(q, first.latency, last.latency) * 1000:.0f} ms"
                        for q in (0.5, 0.95, 0.99))
    print(f"accepted -> committed: {latency}")
    print("push says:\n" + summary)


if __name__ == "__main__":
    main()
