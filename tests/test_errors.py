"""errors.py's tree names every error class ingest raises on purpose, and each refusal's reason
is a metric label."""

import ingest.errors
import ingest.messages
from ingest.errors import IngestError, first_line
from ingest.vocabulary import REJECT_REASONS


def _all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_all_subclasses(sub)}
    return found


def test_the_docstring_tree_names_every_error_class() -> None:
    assert ingest.messages.WriteFailed  # imported, so its class is among the subclasses
    tree = ingest.errors.__doc__ or ""
    missing = sorted(c.__name__ for c in _all_subclasses(IngestError) if f"── {c.__name__} " not in tree)
    assert not missing, f"errors.py's tree leaves out {missing}"


def test_reject_reasons_come_from_the_classes() -> None:
    assert set(REJECT_REASONS) == {
        "invalid", "too_large", "unauthorized", "timeout", "unsupported",
        "queue_full", "shutting_down", "spool_full", "spool_error", "rate_limited", "not_a_listener",
        "stream_full", "stream_unavailable",
    }


def test_first_line_never_fails_on_an_empty_message() -> None:
    assert first_line(TimeoutError()) == "TimeoutError: (no message)"
    assert first_line(ValueError("one\ntwo")) == "ValueError: one"
