"""The request's record (messages.Receipt): one future per ack=commit request, settled exactly once."""

import pytest

from ingest.messages import Message, WriteFailed
from ingest.receipts import Ledger


def _batch(ledger: Ledger, count: int) -> list[Message]:
    receipt = ledger.open(None, count, 0.0, waited_on=True)
    return [Message("{}", 0.0, ident="i", receipt=receipt) for _ in range(count)]


def test_settles_when_the_last_message_is_stored() -> None:
    ledger = Ledger()
    batch = _batch(ledger, 3)
    ack = batch[0].receipt
    assert ack is not None and ack.future is not None
    ledger.committed(batch[:2], [], [])
    assert not ack.future.done()
    ledger.committed(batch[2:], [], [])
    assert ack.future.result(0) == (3, 0)


def test_any_failure_reaches_the_client_with_counts() -> None:
    ledger = Ledger()
    batch = _batch(ledger, 3)
    ack = batch[0].receipt
    assert ack is not None and ack.future is not None
    ledger.committed(batch[:2], [], [])
    ledger.given_up(batch[2:], "refused")
    with pytest.raises(WriteFailed) as info:
        ack.future.result(0)
    assert (str(info.value), info.value.stored, info.value.failed) == ("refused", 2, 1)


def test_cannot_be_cancelled_and_a_second_settlement_is_ignored() -> None:
    ledger = Ledger()
    [message] = _batch(ledger, 1)
    ack = message.receipt
    assert ack is not None and ack.future is not None
    assert not ack.future.cancel()  # a disconnecting client cannot pull it from under a consumer
    ledger.committed([message], [], [])
    ledger.committed([message], [], [])  # the same message again, after a requeue
    ledger.given_up([message], "late")
    assert ack.future.result(0) == (1, 0)


def test_messages_without_ack_are_ignored() -> None:
    ledger = Ledger()
    ledger.committed([Message("{}", 0.0, ident="i")], [], [])
    ledger.given_up([Message("{}", 0.0, ident="i")], "x")


def test_a_dead_letter_fails_the_request_with_the_database_s_word_and_counts_once_for_the_receipt() -> None:
    ledger = Ledger()
    batch = _batch(ledger, 2)
    receipt = batch[0].receipt
    assert receipt is not None and receipt.future is not None
    ledger.committed([batch[0]], [], [(batch[1], "CheckViolation: no")])
    with pytest.raises(WriteFailed) as info:
        receipt.future.result(0)
    refusal = "refused by the database: CheckViolation: no"
    assert (str(info.value), info.value.stored, info.value.failed) == (refusal, 1, 1)
    assert (receipt.stored, receipt.dead, len(ledger)) == (1, 1, 0)  # every message accounted for: out of the ledger


def test_a_duplicate_is_in_the_database_for_the_receipt_and_a_duplicate_for_the_client() -> None:
    ledger = Ledger()
    batch = _batch(ledger, 2)
    receipt = batch[0].receipt
    assert receipt is not None and receipt.future is not None
    ledger.committed([batch[0]], [batch[1]], [])
    assert receipt.future.result(0) == (1, 1)
    assert ledger.lookup(receipt.id) is None  # settled: the database answers for it now
    assert receipt.in_database == 2
