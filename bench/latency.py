"""The latency a stream buffer adds: accepted → committed, memory mode against the stream, same run.

    python bench/latency.py [--rate 50] [--seconds 10] [--batch 100] [--postgres URL]

For each mode (memory: one `ingest serve`; nats-r3: a listener with --consumers 0, three local
nats-server processes with sync_interval always, R=3, and one `ingest write`, as bench/run.py
starts them) it sends requests at a fixed rate (open loop: each at its time, whatever the
answers before it), first with ?ack=enqueue, then with ?ack=commit, and prints p50/p99/max of
the time to the 202 (accepted: in memory, or acked by the stream) and to the 201 (committed in
Postgres, which with the stream is after the writer's report reached the listener). Then the
stream's added latency: its percentile less memory mode's, for each. A fixed, modest rate, so
the figures are the path's, not a queue's; consumers linger --batch-linger (50 ms by default)
to fill a batch in both modes, so part of the time to a 201 is that linger, in both.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time

import aiohttp
from run import Served, Stream, mode_flags, scratch_database

PERCENTILES = (("p50", 0.50), ("p99", 0.99))


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


async def timed_requests(url: str, rate: float, seconds: float, batch: int, ack: str) -> list[float]:
    """Seconds from sending each request to its answer; every answer must be the expected one."""
    expected = 201 if ack == "commit" else 202
    count = int(rate * seconds)
    times: list[float] = []
    async with aiohttp.ClientSession() as session:

        async def one(index: int) -> None:
            lines = [f'{{"seq": {index}, "n": {n}, "v": 1.5, "ts": "2026-12-04T10:00:00Z"}}' for n in range(batch)]
            body = "\n".join(lines) + "\n"
            started = time.perf_counter()
            async with session.post(f"{url}/messages?ack={ack}", data=body,
                                    headers={"Content-Type": "application/x-ndjson"}) as reply:
                await reply.read()
                if reply.status != expected:
                    raise SystemExit(f"request {index}: {reply.status}, expected {expected}")
            times.append(time.perf_counter() - started)

        start = time.perf_counter()
        tasks = []
        for index in range(count):
            await asyncio.sleep(max(0.0, start + index / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(index)))
        await asyncio.gather(*tasks)
    return times


def measure(mode: str, db_url: str, tmp: str, args: argparse.Namespace) -> dict[str, list[float]]:
    stream = Stream(tmp) if mode.startswith("nats-") else None
    try:
        flags = mode_flags(mode, tmp, stream)
        served = Served(db_url, flags.flags)
        writers = [Served(db_url, flags.writers, command="write") for _ in range(flags.count)] if flags.writers else []
        try:
            asyncio.run(timed_requests(served.url, args.rate, 2, args.batch, "commit"))  # warm up both paths
            return {ack: asyncio.run(timed_requests(served.url, args.rate, args.seconds, args.batch, ack))
                    for ack in ("enqueue", "commit")}
        finally:
            for process in [served, *writers]:
                process.stop()
    finally:
        if stream is not None:
            stream.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=50.0, help="requests a second")
    parser.add_argument("--seconds", type=float, default=10.0, help="of each measured run")
    parser.add_argument("--batch", type=int, default=100, help="messages a request (NDJSON)")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test",
                        help="an admin URL; the benchmark creates and drops its own database")
    args = parser.parse_args()
    print(f"{args.rate:g} requests/s of {args.batch} messages for {args.seconds:g} s a run, open loop; "
          "ms from sending to the answer")
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, scratch_database(args.postgres, "ingest_latency") as db_url:
        for mode in ("memory", "nats-r3"):
            results[mode] = measure(mode, db_url, tmp, args)
            for ack, answer in (("enqueue", "202"), ("commit", "201")):
                times = results[mode][ack]
                figures = ", ".join(f"{name} {percentile(times, share) * 1000:.1f}" for name, share in PERCENTILES)
                print(f"{mode:8} {answer} (ack={ack}): {figures}, max {max(times) * 1000:.1f}, "
                      f"mean {statistics.mean(times) * 1000:.1f} ({len(times)} requests)")
    for ack, answer in (("enqueue", "202"), ("commit", "201")):
        stream, memory = results["nats-r3"][ack], results["memory"][ack]
        added = ", ".join(f"{name} {(percentile(stream, share) - percentile(memory, share)) * 1000:+.1f}"
                          for name, share in PERCENTILES)
        print(f"the stream adds to the {answer}: {added} ms (its percentile less memory mode's)")


if __name__ == "__main__":
    sys.exit(main())
