"""The serving batcher: batches form when the model is free, within their row budget."""

from __future__ import annotations

import asyncio

import pytest

from biglearn.serve.batching import Batcher


class SlowModel:
    """Doubles each item. Each call is recorded, then waits for `gate` (when given) or sleeps."""

    def __init__(self, seconds: float = 0.01, fail_on: int | None = None, gate: asyncio.Event | None = None):
        self.seconds = seconds
        self.fail_on = fail_on
        self.gate = gate
        self.calls: list[list[int]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(items)
        if self.gate is not None:
            await self.gate.wait()
        else:
            await asyncio.sleep(self.seconds)
        if self.fail_on in items:
            raise ValueError(f"cannot take {self.fail_on}")
        return [2 * item for item in items]


async def until(condition) -> None:
    while not condition():
        await asyncio.sleep(0)


def test_what_arrives_while_the_model_runs_is_its_next_batch():
    async def scenario():
        model = SlowModel(gate=asyncio.Event())
        batcher = Batcher(model, rows=lambda item: 1, max_rows=64, wait_s=0)
        first = asyncio.create_task(batcher.submit(0))
        await until(lambda: model.calls)  # the first call is running
        later = []
        for item in range(1, 11):  # arrivals spread over the call, as through a gateway
            later.append(asyncio.create_task(batcher.submit(item)))
            await asyncio.sleep(0)
        model.gate.set()
        return model.calls, await asyncio.gather(first, *later)

    calls, results = asyncio.run(scenario())
    assert results == [2 * item for item in range(11)]
    assert calls == [[0], list(range(1, 11))]


def test_batches_keep_to_their_rows_and_an_oversized_item_runs_alone():
    async def scenario():
        model = SlowModel(seconds=0.01)
        batcher = Batcher(model, rows=lambda item: item, max_rows=7, wait_s=0.05)
        results = await asyncio.gather(*(batcher.submit(item) for item in (3, 3, 3, 10, 1)))
        return model.calls, results

    calls, results = asyncio.run(scenario())
    assert results == [6, 6, 6, 20, 2]
    assert calls == [[3, 3], [3], [10], [1]]  # oldest first; 3 + 3 + 3 > 7; 10 > 7 alone


def test_a_short_wait_gathers_callers_that_come_close_together():
    async def scenario():
        model = SlowModel(seconds=0.01)
        batcher = Batcher(model, rows=lambda item: 1, max_rows=64, wait_s=0.2)

        async def late(item):
            await asyncio.sleep(0.02)
            return await batcher.submit(item)

        await asyncio.gather(batcher.submit(1), late(2))
        return model.calls

    assert asyncio.run(scenario()) == [[1, 2]]


def test_a_failed_call_reaches_its_callers_and_later_ones_are_served():
    async def scenario():
        model = SlowModel(fail_on=2)
        batcher = Batcher(model, rows=lambda item: 1, max_rows=64, wait_s=0.05)
        outcomes = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        return outcomes, await batcher.submit(3)

    outcomes, later = asyncio.run(scenario())
    assert [type(o) for o in outcomes] == [ValueError, ValueError] and "cannot take 2" in str(outcomes[0])
    assert later == 6


def test_a_caller_that_stops_waiting_is_left_out():
    async def scenario():
        model = SlowModel(gate=asyncio.Event())
        batcher = Batcher(model, rows=lambda item: 1, max_rows=64, wait_s=0)
        first = asyncio.create_task(batcher.submit(0))
        await until(lambda: model.calls)
        gone = asyncio.create_task(batcher.submit(1))
        kept = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0)
        gone.cancel()
        model.gate.set()
        results = await asyncio.gather(first, kept)
        with pytest.raises(asyncio.CancelledError):
            await gone
        return model.calls, results

    calls, results = asyncio.run(scenario())
    assert results == [0, 4]
    assert calls == [[0], [2]]


@pytest.mark.parametrize(
    "broken, expected",
    [
        (lambda items: [0] * (len(items) - 1), "returned 1 results for 2 requests"),
        (lambda items: (_ for _ in ()).throw(asyncio.CancelledError()), "interrupted"),
    ],
)
def test_a_call_that_breaks_fails_its_callers_instead_of_leaving_them_waiting(broken, expected):
    async def scenario():
        calls = []

        async def run(items):
            calls.append(items)
            if len(calls) == 1:
                return broken(items)
            return [2 * item for item in items]

        batcher = Batcher(run, rows=lambda item: 1, max_rows=64, wait_s=0.05)
        outcomes = await asyncio.wait_for(
            asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True), 5
        )
        return outcomes, await asyncio.wait_for(batcher.submit(3), 5)

    outcomes, later = asyncio.run(scenario())
    assert all(isinstance(o, RuntimeError) and expected in str(o) for o in outcomes), outcomes
    assert later == 6
