"""The words the service, its settings and its clients share, each defined once here.

Reject reasons are not listed by hand: each error class that refuses a request names its own
(`reason`, errors.py), and the metric labels are read off the classes, so a new refusal cannot
be counted under a label the dashboards were never told about.
"""

from __future__ import annotations

from ingest.errors import Backpressure, IngestError, Rejected

ACK_MODES = ("enqueue", "commit")  # 202 once accepted, or 201 once committed (?ack=)
SPOOL_SYNC_MODES = ("full", "normal")  # a 202 survives a power cut, or the process dying


def _reasons(*roots: type[IngestError]) -> tuple[str, ...]:
    """Every `reason` of these classes and their subclasses, in the order they are defined."""
    seen: dict[str, None] = {}
    pending: list[type[IngestError]] = list(roots)
    while pending:
        cls = pending.pop(0)
        seen.setdefault(str(getattr(cls, "reason", "")), None)
        pending.extend(cls.__subclasses__())
    return tuple(reason for reason in seen if reason)


REJECT_REASONS = _reasons(Rejected, Backpressure)
