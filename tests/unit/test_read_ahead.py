"""The training loop's read-ahead thread: order, errors, how far ahead it reads, and that it stops."""

import itertools
import threading
import time

import pytest

from biglearn.train.ingest import read_ahead


def test_items_arrive_in_order_and_errors_reach_the_consumer():
    def items():
        yield from range(10)
        raise OSError("shard-3.parquet is unreadable")

    received = []
    with pytest.raises(OSError, match="shard-3.parquet"), read_ahead(items(), 3) as drawn:
        for item in drawn:
            received.append(item)
    assert received == list(range(10))

    with read_ahead(iter(range(5)), 2) as drawn:
        assert list(drawn) == [0, 1, 2, 3, 4]


def test_reads_at_most_ahead_items_in_advance_and_stops_on_exit():
    taken = []

    def endless():
        for number in itertools.count():
            taken.append(number)
            yield number

    with read_ahead(endless(), 4) as drawn:
        assert next(drawn) == 0
        time.sleep(0.5)
        # 1 handed over, 4 waiting in the queue, 1 drawn and waiting for room.
        assert len(taken) == 6
    time.sleep(0.5)  # the thread notices within its 0.1 s hand-over timeout
    assert "biglearn-read-ahead" not in [thread.name for thread in threading.enumerate()]
    assert len(taken) == 6
