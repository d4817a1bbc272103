"""What runs a loaded model, whatever the model is: its one worker thread (every call of the encoder runs there, so a
tokenizer, a forward pass, a sleep and a wake never race), the micro-batchers that feed it under the one failure
policy, its residency (asleep or awake) and its health. A model's service class says what to batch and how; the
app starts, watches and stops the runtime (as LitServe's server owns its loops, not the model)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from common.batching import MicroBatcher, RowsFailed
from common.config import ServiceSettings
from common.errors import OutOfMemory
from common.failures import BatchOutOfMemory, run_pass
from common.residency import Releasable, Residency, pick_sleep_mode

logger = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")
Result = TypeVar("Result")

# Single-item forward passes that fail in a row (with no success between) before the device counts as broken.
FAILURES_BEFORE_UNHEALTHY = 3


class ModelRuntime:
    def __init__(self, settings: ServiceSettings, weights: Releasable, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batchers: list[MicroBatcher[Any, Any]] = []
        # False once the device keeps failing: /health turns 503 so a supervisor restarts the process.
        self.healthy = True
        self._failures_in_a_row = 0
        self._closers: list[Callable[[], None]] = []
        # Sleeps and wakes run on the model's worker too, between batches.
        self.residency = Residency(
            weights,
            self.worker,
            mode=pick_sleep_mode(settings.sleep_mode, device),
            idle_sleep_s=settings.idle_sleep_s,
            timeout_s=settings.request_timeout_s,
        )

    def batcher(
        self,
        run_batch: Callable[[list[In]], Sequence[Out] | np.ndarray],
        name: str,
        *,
        cost: Callable[[In], int] | None = None,
        max_batch_cost: int | None = None,
    ) -> MicroBatcher[In, Out]:
        """A batcher that runs ``run_batch`` on the worker under the failure policy, with the settings' size, wait,
        queue and timeout; ``cost``/``max_batch_cost``: see ``MicroBatcher``."""
        batcher: MicroBatcher[In, Out] = MicroBatcher(
            self._guarded(run_batch),
            executor=self.worker,
            max_batch_size=self.settings.max_batch_size,
            max_wait_s=self.settings.max_batch_wait_ms / 1000,
            max_queue=self.settings.max_queue_items,
            timeout_s=self.settings.request_timeout_s,
            name=name,
            cost=cost,
            max_batch_cost=max_batch_cost,
        )
        self.batchers.append(batcher)
        return batcher

    async def run(self, function: Callable[..., Result], *args: Any) -> Result:
        """``function(*args)`` on the model's worker, between batches: any other call of the encoder (a tokenizer
        rewrites its padding and truncation state on each call, so two threads tokenizing at once break each
        other's calls)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, function, *args)

    def _guarded(
        self, run_batch: Callable[[list[In]], Sequence[Out] | np.ndarray]
    ) -> Callable[[list[In]], Sequence[Out] | np.ndarray]:
        """``run_batch`` under the shared failure policy (``common.failures.run_pass``: out of memory, NaN rows),
        and repeated failures of lone items seen as a broken device, not a bad input."""

        def run(items: list[In]) -> Sequence[Out] | np.ndarray:
            try:
                result = run_pass(run_batch, items, self.device)
            except (BatchOutOfMemory, OutOfMemory, RowsFailed):
                raise
            except Exception:
                if len(items) == 1:
                    self._failures_in_a_row += 1
                    if self._failures_in_a_row >= FAILURES_BEFORE_UNHEALTHY and self.healthy:
                        logger.error(
                            "%d forward passes failed in a row: marking the service unhealthy", self._failures_in_a_row
                        )
                        self.healthy = False
                raise
            self._failures_in_a_row = 0
            return result

        return run

    def on_stop(self, close: Callable[[], None]) -> None:
        """``close()`` once the worker has stopped (a model's own threads: the image decoders)."""
        self._closers.append(close)

    async def start(self) -> None:
        for batcher in self.batchers:
            batcher.start()
        self.residency.start()

    async def stop(self) -> None:
        await self.residency.stop()
        for batcher in self.batchers:
            await batcher.stop()
        self.worker.shutdown(wait=True)
        for close in self._closers:
            close()
