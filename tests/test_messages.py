"""The Ack: one future per ack=commit request, settled exactly once."""

import pytest

from ingest.messages import Ack, Message, WriteFailed, settle_failed, settle_stored


def test_settles_when_the_last_message_is_stored() -> None:
    ack = Ack(3)
    batch = [Message("{}", 0.0, ack, ident="i") for _ in range(3)]
    settle_stored(batch[:2])
    assert not ack.future.done()
    settle_stored(batch[2:])
    assert ack.future.result(0) == (3, 0)


def test_any_failure_reaches_the_client_with_counts() -> None:
    ack = Ack(3)
    batch = [Message("{}", 0.0, ack, ident="i") for _ in range(3)]
    settle_stored(batch[:2])
    settle_failed(batch[2:], "refused")
    with pytest.raises(WriteFailed) as info:
        ack.future.result(0)
    assert (str(info.value), info.value.stored, info.value.failed) == ("refused", 2, 1)


def test_cannot_be_cancelled_and_a_second_settlement_is_ignored() -> None:
    ack = Ack(1)
    assert not ack.future.cancel()  # a disconnecting client cannot pull it from under a consumer
    message = Message("{}", 0.0, ack, ident="i")
    settle_stored([message])
    settle_stored([message])  # the same message again, after a requeue
    settle_failed([message], "late")
    assert ack.future.result(0) == (1, 0)


def test_messages_without_ack_are_ignored() -> None:
    settle_stored([Message("{}", 0.0, ident="i")])
    settle_failed([Message("{}", 0.0, ident="i")], "x")
