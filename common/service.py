"""What both services' loaded state has in common: one GPU worker thread, micro-batchers on it, input checks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from common.batching import MicroBatcher
from common.config import ServiceSettings, limit_hint
from common.errors import InvalidRequestBody, OutOfMemory, PayloadTooLarge, TooManyItems

logger = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


# Single-item forward passes that fail in a row (with no success between) before the device counts as broken.
FAILURES_BEFORE_UNHEALTHY = 3


class BatchedService:
    """Owns the model's single worker thread (one forward pass at a time) and the batchers that feed it."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.model_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batchers: list[MicroBatcher[Any, Any]] = []
        # False once the device keeps failing: /health turns 503 so a supervisor restarts the process.
        self.healthy = True
        self._failures_in_a_row = 0

    def make_batcher(
        self, run_batch: Callable[[list[In]], Sequence[Out] | np.ndarray], name: str
    ) -> MicroBatcher[In, Out]:
        batcher: MicroBatcher[In, Out] = MicroBatcher(
            self._guarded(run_batch),
            executor=self.model_worker,
            max_batch_size=self.settings.max_batch_size,
            max_wait_s=self.settings.max_batch_wait_ms / 1000,
            max_queue=self.settings.max_queue_items,
            timeout_s=self.settings.request_timeout_s,
            name=name,
        )
        self.batchers.append(batcher)
        return batcher

    def _guarded(
        self, run_batch: Callable[[list[In]], Sequence[Out] | np.ndarray]
    ) -> Callable[[list[In]], Sequence[Out] | np.ndarray]:
        """Out-of-memory -> free the cache and let the batcher split the batch; a lone item that still does not fit
        is a 503. Repeated failures of lone items mean a broken device, not a bad input."""

        def run(items: list[In]) -> Sequence[Out] | np.ndarray:
            try:
                result = run_batch(items)
            except torch.OutOfMemoryError:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if len(items) == 1:
                    raise OutOfMemory("one item does not fit in device memory; try a smaller input") from None
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

    async def start(self) -> None:
        for batcher in self.batchers:
            batcher.start()

    async def stop(self) -> None:
        for batcher in self.batchers:
            await batcher.stop()
        self.model_worker.shutdown(wait=True)

    def check_count(self, count: int, what: str) -> None:
        limit = self.settings.max_items_per_request
        if count > limit:
            raise TooManyItems(
                f"{count} {what} in one request; the limit is {limit_hint('max_items_per_request', limit)}"
            )

    def check_texts(self, texts: Sequence[str]) -> None:
        self.check_count(len(texts), "texts")
        limit = self.settings.max_text_chars
        for index, text in enumerate(texts):
            if len(text) > limit:
                raise PayloadTooLarge(
                    f"text {index} has {len(text)} characters; the limit is {limit_hint('max_text_chars', limit)}"
                )
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    # A lone surrogate ("\ud800" escaped in JSON) would fail inside the tokenizer, in the model's
                    # worker, where it would count as a device failure.
                    raise InvalidRequestBody(f"text {index} is not valid Unicode (it has a lone surrogate)") from None


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def stack_rows(rows: Sequence[np.ndarray], normalize: bool) -> np.ndarray:
    matrix = np.stack(rows).astype(np.float32, copy=False)
    return l2_normalize(matrix) if normalize else matrix
