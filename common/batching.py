"""A micro-batcher: items from many concurrent requests share one forward pass.

Callers ``await batcher.submit(items)``; a loop gathers queued items until ``max_batch_size`` of them are waiting or
``max_wait_s`` has passed since the first (or the next item would take the batch past ``max_batch_cost``), then runs
``run_batch`` on one worker thread (the model's only one) and hands each caller back exactly its own rows, in order.
A batch's cost is its size times the largest ``cost`` of its items: what a batch padded to its longest item computes
(text-embeddings-inference batches by such a budget of padded tokens), so the batch formed is the pass that runs.
A batch that raises is split in halves and retried, so a bad item (or a batch too big for GPU memory) fails only
the requests it belongs to. A batch whose rows failed on
their own (``RowsFailed``: a NaN vector is its input's alone) is not run again: each caller gets its rows' results
or errors from that one pass.

The queue is bounded (``max_queue``): past it ``submit`` fails at once with 429 instead of letting latency grow
without limit, and a caller waits at most ``timeout_s`` for its rows. A caller that goes away (its task cancelled)
takes its rows with it: they are skipped, never run. ``close`` fails everything not yet running with 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from common.errors import NotReady, QueueFull, RequestTimeout

logger = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


class RowsFailed(Exception):
    """Raised by ``run_batch`` when some rows of its batch failed and the others are good, each row computed on its
    own (a retry in smaller batches would give the same rows): ``errors`` by row, ``outputs`` for every row."""

    def __init__(self, outputs: Sequence[Any] | np.ndarray, errors: Mapping[int, Exception]) -> None:
        super().__init__(f"{len(errors)} of {len(outputs)} rows failed")
        self.outputs = outputs
        self.errors = dict(errors)


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    queued_at: float = field(default_factory=time.perf_counter)


# (batcher name, batch size, seconds each item waited in the queue, seconds the forward pass took)
BatchObserver = Callable[[str, int, list[float], float], None]


class MicroBatcher(Generic[In, Out]):
    def __init__(
        self,
        run_batch: Callable[[list[In]], Sequence[Out] | np.ndarray],
        *,
        executor: Executor,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int = 1_000_000,
        timeout_s: float | None = None,
        name: str = "batch",
        cost: Callable[[In], int] | None = None,
        max_batch_cost: int | None = None,
    ) -> None:
        """``cost``: an item's cost (an upper bound of its padded length, say), reckoned on the event loop, so cheap;
        an item whose cost alone is over ``max_batch_cost`` runs on its own."""
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.name = name
        self._cost = cost
        self.max_batch_cost = max_batch_cost
        self.observer: BatchObserver | None = None
        self._queue: asyncio.Queue[_Pending[In, Out]] = asyncio.Queue()
        # Items taken from the queue for the next batch, while it waits for more (not running yet).
        self._gathering: list[_Pending[In, Out]] = []
        # The item that would have taken the last batch past max_batch_cost: the next batch's first.
        self._carried: _Pending[In, Out] | None = None
        self._closed: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        self.close("the service is shutting down")
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def close(self, reason: str) -> None:
        """Fail every item that is not running yet, and every later ``submit``, with 503 ``not_ready``; the batch
        on the model now still finishes."""
        self._closed = reason
        carried = [self._carried] if self._carried is not None else []
        waiting = [*self._gathering, *carried, *(self._queue.get_nowait() for _ in range(self._queue.qsize()))]
        self._gathering, self._carried = [], None
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(self._not_ready())

    def _not_ready(self) -> NotReady:
        return NotReady(f"{self._closed}; retry shortly", headers={"Retry-After": "5"})

    async def submit(self, items: Sequence[In]) -> list[Out]:
        """Queue every item, wait for all of them; results come back in the order of ``items``."""
        if self._closed is not None:
            raise self._not_ready()
        if self._task is None:
            raise RuntimeError(f"batcher {self.name} is not running")
        if self._queue.qsize() + len(items) > self.max_queue:
            raise QueueFull(
                f"the {self.name} queue is full ({self._queue.qsize()} items waiting); retry shortly",
                headers={"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Out]] = []
        for item in items:
            pending: _Pending[In, Out] = _Pending(item, loop.create_future())
            self._queue.put_nowait(pending)
            futures.append(pending.future)
        try:
            async with asyncio.timeout(self.timeout_s):
                if len(futures) == 1:  # one item, as most requests have: its future itself, without gather's
                    return [await futures[0]]
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            raise RequestTimeout(
                f"no result within {self.timeout_s:g} s (the service is overloaded); retry later",
                headers={"Retry-After": "5"},
            ) from None
        finally:
            for future in futures:  # a failed sibling, a timeout or a gone client: drop our remaining rows
                future.cancel()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._live_item()
            batch = self._gathering = [first]
            widest = self._cost_of(first)
            # One timer for the whole gathering, not one per wait (wait_for would even make each wait a task).
            try:
                async with asyncio.timeout_at(loop.time() + self.max_wait_s):
                    while len(batch) < self.max_batch_size:
                        if self._queue.empty():
                            pending = await self._live_item()
                        else:
                            pending = self._queue.get_nowait()
                            if pending.future.done():
                                continue
                        wider = max(widest, self._cost_of(pending))
                        if self.max_batch_cost is not None and (len(batch) + 1) * wider > self.max_batch_cost:
                            self._carried = pending  # it starts the next batch
                            break
                        batch.append(pending)
                        widest = wider
            except TimeoutError:
                pass  # waited long enough: run what has come
            self._gathering = []
            await self._run(batch)

    def _cost_of(self, pending: _Pending[In, Out]) -> int:
        return 0 if self._cost is None else self._cost(pending.item)

    async def _live_item(self) -> _Pending[In, Out]:
        """The next item whose caller still waits (rows of callers that are gone are dropped here): the one the
        last batch could not take, else the queue's next."""
        carried, self._carried = self._carried, None
        if carried is not None and not carried.future.done():
            return carried
        while True:
            pending = await self._queue.get()
            if not pending.future.done():
                return pending

    async def _run(self, batch: list[_Pending[In, Out]]) -> None:
        batch = [pending for pending in batch if not pending.future.done()]  # skip cancelled callers
        if not batch:
            return
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        outputs: Sequence[Out] | np.ndarray | None = None
        row_errors: dict[int, Exception] = {}
        failure = ""
        try:
            outputs = await loop.run_in_executor(self._executor, self._run_batch, [p.item for p in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"run_batch returned {len(outputs)} rows for {len(batch)} items")
        except RowsFailed as partial:  # the pass itself worked: its rows are final
            outputs, row_errors = partial.outputs, partial.errors
        except Exception as exc:  # noqa: BLE001 - any failure is split and handed to the callers it belongs to
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(exc)
                return
            outputs, failure = None, f"{type(exc).__name__}: {exc}"  # only text: no reference to the error
        if outputs is None:
            # The halves run outside the except block: there the error's traceback would keep the failed pass's
            # frames, and every tensor they held (a batch too big for GPU memory), alive while the halves run.
            logger.warning("%s batch of %d failed (%s); retrying in halves", self.name, len(batch), failure)
            half = len(batch) // 2
            await self._run(batch[:half])
            await self._run(batch[half:])
            return
        if self.observer is not None:
            self.observer(self.name, len(batch), [started - p.queued_at for p in batch], time.perf_counter() - started)
        for row, (pending, output) in enumerate(zip(batch, outputs, strict=True)):
            if pending.future.done():
                continue
            if row in row_errors:
                pending.future.set_exception(row_errors[row])
            else:
                pending.future.set_result(output)
