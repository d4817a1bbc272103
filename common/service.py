"""What both services' loaded state has in common: one GPU worker thread, micro-batchers on it, input checks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from common.batching import MicroBatcher
from common.config import ServiceSettings, limit_hint
from common.errors import PayloadTooLarge, TooManyItems

In = TypeVar("In")
Out = TypeVar("Out")


class BatchedService:
    """Owns the model's single worker thread (one forward pass at a time) and the batchers that feed it."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.model_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._batchers: list[MicroBatcher[object, object]] = []

    def make_batcher(
        self, run_batch: Callable[[list[In]], Sequence[Out] | np.ndarray], name: str
    ) -> MicroBatcher[In, Out]:
        batcher: MicroBatcher[In, Out] = MicroBatcher(
            run_batch,
            executor=self.model_worker,
            max_batch_size=self.settings.max_batch_size,
            max_wait_s=self.settings.max_batch_wait_ms / 1000,
            name=name,
        )
        self._batchers.append(batcher)  # type: ignore[arg-type]
        return batcher

    async def start(self) -> None:
        for batcher in self._batchers:
            batcher.start()

    async def stop(self) -> None:
        for batcher in self._batchers:
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


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def stack_rows(rows: Sequence[np.ndarray], normalize: bool) -> np.ndarray:
    matrix = np.stack(rows).astype(np.float32, copy=False)
    return l2_normalize(matrix) if normalize else matrix
