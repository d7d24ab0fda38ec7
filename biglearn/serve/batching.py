"""Batching for a model that runs one call at a time: the next batch forms when the model is free."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """Gathers concurrent submissions into calls of `run`, one call at a time.

    A batch is formed when the previous call has returned, from everything submitted meanwhile
    (oldest first, up to `max_rows` as `rows` counts them), so a busy model gets full batches.
    When fewer rows are waiting it waits up to `wait_s` for more. A submission larger than
    `max_rows` runs alone. A caller that stops waiting (cancelled) is left out of the next batch;
    an exception from `run` reaches every caller of that batch.

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
        self._waiting: deque[tuple[Item, asyncio.Future[Result]]] = deque()
        self._arrived: asyncio.Event | None = None  # made on the loop that serves the calls
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        """`run`'s result for `item`, computed in a batch with other callers' items."""
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._serve(self._arrived))
        future: asyncio.Future[Result] = loop.create_future()
        self._waiting.append((item, future))
        self._arrived.set()
        return await future

    async def _serve(self, arrived: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await arrived.wait()
            arrived.clear()
            deadline = loop.time() + self.wait_s
            while self._waiting_rows() < self.max_rows and (remaining := deadline - loop.time()) > 0:
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
            try:
                results = await self._run([item for item, _ in batch])
            except Exception as exc:  # each caller of the batch gets it as its call's outcome
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)

    def _waiting_rows(self) -> int:
        return sum(self._rows(item) for item, future in self._waiting if not future.done())

    def _take(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        rows = 0
        while self._waiting:
            item, future = self._waiting[0]
            if future.done():  # its caller was cancelled
                self._waiting.popleft()
                continue
            if batch and rows + self._rows(item) > self.max_rows:
                break
            batch.append(self._waiting.popleft())
            rows += self._rows(item)
        return batch
