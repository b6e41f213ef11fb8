"""Dynamic batching: requests that arrive within a few milliseconds of each other run as one batch.

`DynamicBatcher.submit(tensor)` queues one preprocessed image (bounded: `QueueFull` past
`max_queue`) and returns a future for its output; `run` takes a list of same-shape tensors and
returns one output per tensor. One loop on the event loop takes the
first waiting item, gathers more for up to `max_wait` seconds or `max_batch` items, groups them
by shape (a batch needs one size), and runs each group in a worker thread so the server keeps
answering while the model computes. `close()` stops new submissions and finishes what is queued.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import torch


class QueueFull(RuntimeError):
    """More requests are waiting than the queue holds: the caller should answer 503."""


class ShuttingDown(RuntimeError):
    """The server is stopping and takes no new work."""


@dataclass
class _Item:
    tensor: torch.Tensor
    future: asyncio.Future


class DynamicBatcher:
    def __init__(
        self,
        run: Callable[[list[torch.Tensor]], list],
        max_batch: int = 32,
        max_wait: float = 0.005,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError("max_batch and max_queue must be at least 1, max_wait non-negative")
        self.run, self.max_batch, self.max_wait, self.max_queue = run, max_batch, max_wait, max_queue
        self.on_batch = on_batch or (lambda size: None)
        self.queue: asyncio.Queue[_Item | None] | None = None
        self.task: asyncio.Task | None = None
        self.closed = False
        self.pending = 0  # submitted, not yet answered

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    @property
    def depth(self) -> int:
        """Items waiting for a batch (not those running)."""
        return self.queue.qsize() if self.queue is not None else 0

    def submit(self, tensor: torch.Tensor) -> asyncio.Future:
        if self.closed or self.queue is None:
            raise ShuttingDown("the server is shutting down")
        if self.queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self.queue.qsize()} requests are already waiting (the queue holds {self.max_queue})")
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Item(tensor, future))
        self.pending += 1
        future.add_done_callback(lambda _: setattr(self, "pending", self.pending - 1))
        return future

    async def close(self) -> None:
        """Take nothing new; answer everything already queued; then stop the loop."""
        if self.closed or self.queue is None:
            return
        self.closed = True
        self.queue.put_nowait(None)
        await self.task

    async def _gather(self, first: _Item) -> tuple[list[_Item], bool]:
        """`first` and what else arrives within max_wait (up to max_batch); whether the stop mark came."""
        items, loop = [first], asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(items) < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except TimeoutError:
                    break
            if item is None:
                return items, True
            items.append(item)
        return items, False

    async def _loop(self) -> None:
        stop = False
        while not stop:
            first = await self.queue.get()
            if first is None:
                break
            items, stop = await self._gather(first)
            live = [i for i in items if not i.future.done()]  # a timed-out request's future is cancelled
            groups: dict[tuple, list[_Item]] = {}
            for item in live:
                groups.setdefault(tuple(item.tensor.shape), []).append(item)
            for group in groups.values():
                self.on_batch(len(group))
                try:
                    out = await asyncio.to_thread(self.run, [i.tensor for i in group])
                except Exception as e:  # the model failed: every request of the batch hears why
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(e)
                    continue
                for item, row in zip(group, out):
                    if not item.future.done():
                        item.future.set_result(row)
