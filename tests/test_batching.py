"""The micro-batcher with plain functions: merging, order, isolation of failures."""

from __future__ import annotations

import asyncio
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from common.batching import MicroBatcher, RowsFailed


class Recorder:
    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on
        self.threads: set[str] = set()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [item * 10 for item in items]


async def _run(
    recorder: Recorder, requests: list[list[int]], max_batch_size: int = 64, wait: float = 0.02, **cost: Any
) -> list[object]:
    with ThreadPoolExecutor(1, thread_name_prefix="model") as executor:
        batcher: MicroBatcher[int, int] = MicroBatcher(
            recorder, executor=executor, max_batch_size=max_batch_size, max_wait_s=wait, **cost
        )
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(items) for items in requests), return_exceptions=True)
        finally:
            await batcher.stop()


def test_concurrent_requests_share_a_batch_and_keep_order() -> None:
    recorder = Recorder()
    requests = [[i * 3, i * 3 + 1, i * 3 + 2] for i in range(10)]
    results = asyncio.run(_run(recorder, requests))
    assert results == [[x * 10 for x in items] for items in requests]
    assert len(recorder.batches) == 1 and len(recorder.batches[0]) == 30
    assert recorder.threads == {"model_0"}


def test_max_batch_size_splits_large_requests() -> None:
    recorder = Recorder()
    results = asyncio.run(_run(recorder, [list(range(25))], max_batch_size=8))
    assert results == [[x * 10 for x in range(25)]]
    assert [len(batch) for batch in recorder.batches] == [8, 8, 8, 1]


def test_a_cost_budget_forms_batches_padded_within_it() -> None:
    """An item's cost is its padded length: a batch's cost is its size times its widest item's, kept within
    max_batch_cost as the batch forms (the item that would pass it starts the next batch, in order); an item over the
    budget alone runs alone; rows come back to their callers in order."""
    recorder = Recorder()
    requests = [[3, 3, 3], [9], [1, 1, 1, 1], [30], [2, 2]]
    results = asyncio.run(_run(recorder, requests, cost=lambda item: item, max_batch_cost=12))
    assert results == [[x * 10 for x in items] for items in requests]
    assert recorder.batches == [[3, 3, 3], [9], [1, 1, 1, 1], [30], [2, 2]]
    for batch in recorder.batches:
        assert len(batch) * max(batch) <= 12 or len(batch) == 1
    recorder = Recorder()
    asyncio.run(_run(recorder, [[1] * 5, [2] * 3, [3]], cost=lambda item: item, max_batch_cost=12))
    assert recorder.batches == [[1, 1, 1, 1, 1, 2], [2, 2, 3]]  # 6 x 2 = 12; then 3 x 3 = 9


def test_failing_item_fails_only_its_request() -> None:
    recorder = Recorder(fail_on=13)
    requests = [[1, 2], [13], [4, 5, 6], [7]]
    results = asyncio.run(_run(recorder, requests))
    assert results[0] == [10, 20] and results[2] == [40, 50, 60] and results[3] == [70]
    assert isinstance(results[1], ValueError)


def test_rows_that_fail_on_their_own_fail_only_their_callers_without_a_split() -> None:
    """A batch whose rows are computed independently (a NaN vector is that input's alone): run_batch names the rows
    that failed, the others get their results, and nothing runs twice."""

    class FailsOdd(Recorder):
        def __call__(self, items: list[int]) -> list[int]:
            outputs = super().__call__(items)
            raise RowsFailed(outputs, {row: ValueError(f"odd {item}") for row, item in enumerate(items) if item % 2})

    recorder = FailsOdd()
    results = asyncio.run(_run(recorder, [[2, 4], [3], [6, 7, 8], [10]]))
    assert results[0] == [20, 40] and results[3] == [100]
    assert [str(result) for result in results[1:3]] == ["odd 3", "odd 7"]
    assert recorder.batches == [[2, 4, 3, 6, 7, 8, 10]]


def test_submit_without_start_is_an_error() -> None:
    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher: MicroBatcher[int, int] = MicroBatcher(
                lambda x: x, executor=executor, max_batch_size=4, max_wait_s=0
            )
            await batcher.submit([1])

    with pytest.raises(RuntimeError, match="not running"):
        asyncio.run(scenario())


def test_a_failed_batch_is_released_before_its_halves_run() -> None:
    """The split-and-retry of a batch that ran out of memory: what the failed attempt held (its frames, and the
    tensors in them) is gone before the first half runs, or each retry would run with its parents' memory held."""
    failed_attempts: list[weakref.ref[torch.Tensor]] = []
    alive_when_a_half_ran: list[int] = []

    def run_batch(items: list[int]) -> list[int]:
        alive_when_a_half_ran.append(sum(ref() is not None for ref in failed_attempts))
        activations = torch.ones(len(items), 1000)  # what a forward pass holds in its frames when it fails
        if len(items) > 1:
            failed_attempts.append(weakref.ref(activations))
            raise torch.OutOfMemoryError(f"out of memory with a batch of {len(items)} (simulated)")
        return [int(activations.sum()) + item for item in items]

    async def scenario() -> list[int]:
        with ThreadPoolExecutor(1) as executor:
            batcher: MicroBatcher[int, int] = MicroBatcher(
                run_batch, executor=executor, max_batch_size=8, max_wait_s=0.05
            )
            batcher.start()
            try:
                return await batcher.submit(list(range(8)))
            finally:
                await batcher.stop()

    assert asyncio.run(scenario()) == [1000 + item for item in range(8)]
    assert len(failed_attempts) == 7  # 8 -> 4 + 4 -> 2 + 2 + 2 + 2
    assert alive_when_a_half_ran == [0] * 15, alive_when_a_half_ran
