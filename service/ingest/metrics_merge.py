"""One exposition from several: what `/metrics` answers when --workers N processes share a port.

Any worker may get the scrape; it asks the others for theirs (over their unix sockets) and adds
them up, so Prometheus sees one service whichever worker answered. Counters, histograms and
gauges of amounts (queue depth, connections, consumers) are summed; a gauge every worker reads
from the same place (the dead letters in the database) or that the parent sets alike in all of
them is taken once (max); `_created` samples take the earliest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

# Same value in every worker: summing would multiply it.
SHARED = frozenset({"ingest_dead_letters_waiting", "ingest_worker_restarts", "ingest_spool_orphaned_messages"})


def merge(texts: Iterable[str]) -> str:
    families: dict[str, tuple[str, str]] = {}  # name -> (type, help), in first-seen order
    samples: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, (family.type, family.documentation))
            mine = samples.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                mine[key] = _combine(family.name, sample.name, mine.get(key), sample.value)
    lines = []
    for name, (kind, documentation) in families.items():
        lines.append(f"# HELP {name} {_escape_help(documentation)}")
        lines.append(f"# TYPE {name} {kind}")
        for (sample_name, labels), value in samples[name].items():
            rendered = ",".join(f'{key}="{_escape_label(val)}"' for key, val in labels)
            number = floatToGoString(value)  # type: ignore[no-untyped-call]
            lines.append(f"{sample_name}{{{rendered}}} {number}" if labels else f"{sample_name} {number}")
    return "\n".join(lines) + "\n"


def _combine(family: str, sample: str, seen: float | None, value: float) -> float:
    if seen is None:
        return value
    if family in SHARED:
        return max(seen, value)
    if sample.endswith("_created"):
        return min(seen, value)
    return seen + value


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


async def gather(socket_dir: str, own_socket: str, own_text: str, timeout_s: float = 2.0) -> list[str]:
    """This worker's exposition and every other worker's, read from their sockets in `socket_dir`.

    A worker that does not answer (being replaced) is left out of this scrape."""
    others = [p for p in sorted(Path(socket_dir).glob("worker-*.sock")) if str(p) != own_socket]
    texts = await asyncio.gather(*(_read(path, timeout_s) for path in others))
    return [own_text, *(text for text in texts if text is not None)]


async def _read(path: Path, timeout_s: float) -> str | None:
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(path)), timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as session, session.get("http://worker/metrics") as reply:
            return await reply.text() if reply.status == 200 else None
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None
