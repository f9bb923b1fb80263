import threading
import time

import pytest

from ingest.buffer import Buffer
from ingest.errors import QueueFull, ShuttingDown, TooLarge
from ingest.messages import Message


def msgs(n: int, start: int = 0) -> list[Message]:
    return [Message(str(i), 0.0, ident=str(i)) for i in range(start, start + n)]


def ns(batch: list[Message]) -> list[int]:
    return [int(m.text) for m in batch]


def test_put_is_all_or_nothing() -> None:
    buffer = Buffer(5)
    assert buffer.try_put_all(msgs(3))
    assert not buffer.try_put_all(msgs(3, 3))
    assert buffer.depth() == 3
    with pytest.raises(QueueFull):
        buffer.put_all(msgs(3, 3), deadline=time.monotonic())
    assert buffer.depth() == 3


def test_request_larger_than_capacity_is_too_large() -> None:
    with pytest.raises(TooLarge):
        Buffer(2).try_put_all(msgs(3))


def test_waiting_put_succeeds_when_room_appears() -> None:
    buffer = Buffer(2)
    buffer.try_put_all(msgs(2))
    done = threading.Event()

    def producer() -> None:
        buffer.put_all(msgs(2, 2), deadline=time.monotonic() + 30)
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert ns(buffer.take(2, 0, 1)) == [0, 1]
    assert done.wait(10)
    thread.join()
    assert ns(buffer.take(10, 0, 1)) == [2, 3]


def test_take_respects_max_and_order() -> None:
    buffer = Buffer(100)
    buffer.try_put_all(msgs(10))
    assert ns(buffer.take(4, 0, 0)) == [0, 1, 2, 3]
    assert ns(buffer.take(100, 0, 0)) == [4, 5, 6, 7, 8, 9]
    assert buffer.take(100, 0, 0) == []


def test_linger_collects_messages_arriving_while_waiting() -> None:
    buffer = Buffer(100)
    buffer.try_put_all(msgs(1))
    arrived = threading.Event()

    def late_producer() -> None:
        buffer.try_put_all(msgs(2, 1))
        arrived.set()

    timer = threading.Timer(0.05, late_producer)
    timer.start()
    # The linger is long enough that the batch fills to 3 before it ends, whenever the timer runs.
    batch = buffer.take(3, 30.0, 1)
    timer.join()
    assert arrived.is_set()
    assert ns(batch) == [0, 1, 2]


def test_requeue_puts_batch_back_at_the_head_past_capacity() -> None:
    buffer = Buffer(3)
    buffer.try_put_all(msgs(3))
    held = buffer.take(2, 0, 0)
    buffer.try_put_all(msgs(2, 3))
    buffer.requeue(held)
    assert buffer.depth() == 5
    assert ns(buffer.take(10, 0, 0)) == [0, 1, 2, 3, 4]


def test_close_fails_puts_and_lets_consumers_drain() -> None:
    buffer = Buffer(2)
    buffer.try_put_all(msgs(2))
    failures: list[BaseException] = []

    def blocked_producer() -> None:
        try:
            buffer.put_all(msgs(1, 2), deadline=time.monotonic() + 30)
        except ShuttingDown as exc:
            failures.append(exc)

    thread = threading.Thread(target=blocked_producer)
    thread.start()
    buffer.close()
    thread.join(10)
    assert len(failures) == 1
    assert not buffer.drained()
    assert ns(buffer.take(10, 5, 5)) == [0, 1]  # closed: no lingering
    assert buffer.drained()
    assert buffer.take(10, 5, 30) == []  # closed and empty: returns at once


def test_put_all_unless_waits_for_room_and_gives_up_at_the_stop_or_the_close() -> None:
    """The feeders' put (spool and stream): their messages are kept elsewhere, so they wait for room
    as long as it takes, and give up only when told to stop or when the buffer closes."""
    buffer = Buffer(2)
    stop = threading.Event()
    assert buffer.put_all_unless(msgs(2), stop, 0.01)
    stop.set()
    assert not buffer.put_all_unless(msgs(1, 2), stop, 0.01)  # full, and told to stop
    stop.clear()
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(buffer.put_all_unless(msgs(1, 2), stop, 0.01)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # full: still waiting, through many 0.01 s waits
    buffer.close()
    waiter.join(5)
    assert result == [False]
