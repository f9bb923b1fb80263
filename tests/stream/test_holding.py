"""The stream listener's receipts after their 202: kept a while, let go in order (no NATS needed)."""

from __future__ import annotations

from ingest.receipts import Ledger
from ingest.stream.intake import Holding


def test_receipts_are_let_go_in_the_order_they_came_once_their_time_is_up() -> None:
    ledger = Ledger()
    holding = Holding(ledger, hold_s=30.0)
    first, second, third = (ledger.open(None, 1, 0.0) for _ in range(3))
    holding.keep(first, now=0.0)
    holding.keep(second, now=1.0)
    holding.keep(third, now=2.0)
    assert len(ledger) == 3 and len(holding) == 3

    holding.release(now=29.9)
    assert len(ledger) == 3
    holding.release(now=30.5)
    assert ledger.get(first.id) is None
    assert ledger.get(second.id) is second and ledger.get(third.id) is third

    fourth = ledger.open(None, 1, 0.0)
    holding.keep(fourth, now=31.0)  # keeping also lets go of what is due
    assert ledger.get(second.id) is None and ledger.get(third.id) is third
    assert len(holding) == 2

    holding.release(now=100.0)
    assert len(ledger) == 0 and len(holding) == 0


def test_a_receipt_reopened_under_the_same_id_is_not_let_go_with_the_old_one() -> None:
    ledger = Ledger()
    holding = Holding(ledger, hold_s=30.0)
    old = ledger.open("client-id-1", 1, 0.0)
    holding.keep(old, now=0.0)
    newer = ledger.open("client-id-1", 2, 10.0)  # the client reused its id
    holding.keep(newer, now=10.0)
    holding.release(now=35.0)
    assert ledger.get("client-id-1") is newer
