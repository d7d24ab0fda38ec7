"""Batching for a model that runs one call at a time: the next batch forms when the model is free."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """Gathers concurrent submissions into calls of `run`, one call at a time.

    A batch is formed when the previous call has returned, from everything submitted meanwhile
    (oldest first, up to `max_rows` as `rows` counts them), so a busy model gets full batches.
    When fewer rows are waiting, the batch waits for more until its oldest item has waited
    `wait_s`. A submission larger than `max_rows` runs alone. A caller that stops waiting
    (cancelled) is left out of the next batch; an exception from `run` reaches every caller of
    that batch. All calls must come from one event loop.

    (Ray Serve's `serve.batch` forms the next batch while a call is still running and queues it
    behind that call, so under load it sends the model small batches.)
    """

    def __init__(
        self,
        run: Callable[[list[Item]], Awaitable[Sequence[Result]]],
        rows: Callable[[Item], int],
        max_rows: int,
        wait_s: float,
    ):
        self._run = run
        self._rows = rows
        self.max_rows = max_rows
        self.wait_s = wait_s
        self._waiting: deque[Waiting[Item, Result]] = deque()
        self._arrived: asyncio.Event | None = None  # made on the loop that serves the calls
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        """`run`'s result for `item`, computed in a batch with other callers' items."""
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._serve(self._arrived))
        waiting = Waiting(item, loop.create_future(), loop.time())
        self._waiting.append(waiting)
        self._arrived.set()
        return await waiting.future

    async def _serve(self, arrived: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await arrived.wait()
            arrived.clear()
            batch: list[Waiting[Item, Result]] = []
            try:
                while (oldest := self._oldest()) and self._waiting_rows() < self.max_rows:
                    remaining = oldest.since + self.wait_s - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        await asyncio.wait_for(arrived.wait(), remaining)
                    except TimeoutError:
                        break
                    arrived.clear()
                batch = self._take()
                if self._waiting:
                    arrived.set()  # the rest forms the next batch without waiting for an arrival
                if not batch:
                    continue
                results = await self._run([waiting.item for waiting in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the model call returned {len(results)} results for {len(batch)} requests")
            except BaseException as exc:
                failure = (
                    exc if isinstance(exc, Exception) else RuntimeError(f"the model call was interrupted ({exc!r})")
                )
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(failure)
                if failure is not exc:
                    raise
            else:
                for waiting, result in zip(batch, results, strict=True):
                    if not waiting.future.done():
                        waiting.future.set_result(result)

    def _oldest(self) -> Waiting[Item, Result] | None:
        while self._waiting and self._waiting[0].future.done():  # its caller was cancelled
            self._waiting.popleft()
        return self._waiting[0] if self._waiting else None

    def _waiting_rows(self) -> int:
        return sum(self._rows(waiting.item) for waiting in self._waiting if not waiting.future.done())

    def _take(self) -> list[Waiting[Item, Result]]:
        batch: list[Waiting[Item, Result]] = []
        rows = 0
        while oldest := self._oldest():
            if batch and rows + self._rows(oldest.item) > self.max_rows:
                break
            batch.append(self._waiting.popleft())
            rows += self._rows(oldest.item)
        return batch


@dataclass(frozen=True)
class Waiting(Generic[Item, Result]):
    """A submission in the queue: the item, its caller's future, and when it came (loop time)."""

    item: Item
    future: asyncio.Future[Result]
    since: float
