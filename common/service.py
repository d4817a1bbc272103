"""The shared half of every loaded model: one worker thread for the model, micro-batchers feeding it, input checks
done once per request, and the text and OpenAI-input paths both services share. A model's own service class adds
what is specific to it (images, pair probabilities, details for /info)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from common.batching import MicroBatcher, RowsFailed
from common.config import Modality, ServiceSettings, limit_hint
from common.contract import EncodedImage, ModelInfo
from common.errors import (
    InvalidRequestBody,
    OutOfMemory,
    PayloadTooLarge,
    TooManyItems,
    UnsupportedInput,
)
from common.failures import BatchOutOfMemory, run_pass
from common.loading import has_random_weights
from common.precision import GIVEN_WITH_THE_ENCODER, dtype_name
from common.residency import Releasable, Residency, pick_sleep_mode
from embed_client.formats import is_image_data_uri

logger = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


# Single-item forward passes that fail in a row (with no success between) before the device counts as broken.
FAILURES_BEFORE_UNHEALTHY = 3


class TextEncoder(Releasable, Protocol):
    """The pure batch methods of an encoder that reads text (every model here does), and how its weights sleep."""

    source: str  # the folder the weights were loaded from
    fingerprint: str  # of the files the model was loaded from (common.identity)
    device: torch.device
    dimension: int
    dtype: torch.dtype

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def count_tokens(self, texts: Sequence[str]) -> int: ...


class BatchedService:
    """Satisfies ``common.contract.EmbeddingModel``; a model that reads images adds them in its subclass."""

    def __init__(
        self,
        settings: ServiceSettings,
        encoder: TextEncoder,
        *,
        model_name: str,
        version: str,
        device: str,
        dtype_reason: str = GIVEN_WITH_THE_ENCODER,
        run_texts: Callable[[list[Any]], Sequence[Any] | np.ndarray] | None = None,
    ) -> None:
        """``dtype_reason``: why the encoder computes in its dtype (``common.precision.pick_dtype``), for /info.
        ``run_texts``: the batch method the text batcher runs (default: the encoder's ``embed_texts``); a model
        whose text batches carry other kinds of items too (per-token states) passes its own."""
        self.settings = settings
        self.modalities: tuple[Modality, ...] = settings.modalities
        self.text_encoder = encoder
        self.model_name = model_name
        self.dimension = encoder.dimension
        self.version = version
        self.device = device
        self.dtype_reason = dtype_reason
        self.tiny = has_random_weights(encoder.source)
        self.fingerprint = encoder.fingerprint
        self.model_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batchers: list[MicroBatcher[Any, Any]] = []
        self.healthy = True
        self._failures_in_a_row = 0
        self.text_batcher: MicroBatcher[Any, Any] = self.make_batcher(run_texts or encoder.embed_texts, "texts")
        # Sleeps and wakes run on the model's worker too, between batches.
        self.residency = Residency(
            encoder,
            self.model_worker,
            mode=pick_sleep_mode(settings.sleep_mode, encoder.device),
            idle_sleep_s=settings.idle_sleep_s,
            timeout_s=settings.request_timeout_s,
        )

    # -- lifecycle ----------------------------------------------------------------------------------------------

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
        """``run_batch`` under the shared failure policy (``common.failures.run_pass``: out of memory, NaN rows),
        and repeated failures of lone items seen as a broken device, not a bad input."""

        def run(items: list[In]) -> Sequence[Out] | np.ndarray:
            try:
                result = run_pass(run_batch, items, self.text_encoder.device)
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

    async def start(self) -> None:
        for batcher in self.batchers:
            batcher.start()
        self.residency.start()

    async def stop(self) -> None:
        await self.residency.stop()
        for batcher in self.batchers:
            await batcher.stop()
        self.model_worker.shutdown(wait=True)

    # -- what the model says about itself -----------------------------------------------------------------------

    def info(self) -> ModelInfo:
        return ModelInfo(
            model=self.model_name,
            model_path=self.settings.model,
            dimension=self.dimension,
            version=self.version,
            device=self.device,
            dtype=dtype_name(self.text_encoder.dtype),
            dtype_reason=self.dtype_reason,
            modalities=list(self.modalities),
            tiny=self.tiny,
            fingerprint=self.fingerprint,
            **self.details(),
        )

    def details(self) -> dict[str, Any]:
        """Model-specific keys for /info (preprocessing, recipe, ...)."""
        return {}

    # -- input checks: each runs once per request, before any heavy work ----------------------------------------

    def check_count(self, count: int, what: str) -> None:
        limit = self.settings.max_items_per_request
        if count > limit:
            raise TooManyItems(
                f"{count} {what} in one request; the limit is {limit_hint('max_items_per_request', limit)}"
            )

    def check_texts(self, texts: Sequence[str]) -> None:
        self.check_count(len(texts), "texts")
        self._check_text_contents(texts)

    def _check_text_contents(self, texts: Sequence[str]) -> None:
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

    # -- embedding ----------------------------------------------------------------------------------------------

    # Each request's work is "in use" of the model: checked first (a bad request never wakes a sleeping model),
    # then the model is woken if it sleeps, and the idle timer waits until the request is done.

    async def embed_texts(self, texts: Sequence[str], normalize: bool) -> np.ndarray:
        self.check_texts(texts)
        async with self.residency.in_use():
            return await self._embed_checked_texts(texts, normalize)

    async def embed_images(self, images: Sequence[EncodedImage], normalize: bool) -> np.ndarray:
        self._require_images()
        self.check_count(len(images), "images")
        async with self.residency.in_use():
            return await self._embed_checked_images(images, normalize)

    async def embed_texts_and_images(
        self, texts: Sequence[str], images: Sequence[EncodedImage]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Both lists at once (texts checked before any image is decoded), L2-normalised, for cross-modal scores."""
        self._require_images()
        self.check_texts(texts)
        self.check_count(len(images), "images")
        async with self.residency.in_use():
            text_vectors, image_vectors = await asyncio.gather(
                self._embed_checked_texts(texts, True), self._embed_checked_images(images, True)
            )
        return text_vectors, image_vectors

    async def embed_inputs(self, inputs: Sequence[str], normalize: bool) -> tuple[np.ndarray, int]:
        """The OpenAI route: on a model that reads images, data:image/... URIs are images; everything else is text.
        Returns the vectors in input order and the number of text tokens the model read."""
        self.check_count(len(inputs), "inputs")
        takes_images = "image" in self.modalities
        image_rows = [i for i, item in enumerate(inputs) if takes_images and is_image_data_uri(item)]
        text_rows = sorted(set(range(len(inputs))) - set(image_rows))
        texts = [inputs[i] for i in text_rows]
        self._check_text_contents(texts)
        async with self.residency.in_use():
            return await self._embed_checked_inputs(inputs, image_rows, text_rows, normalize)

    async def _embed_checked_inputs(
        self, inputs: Sequence[str], image_rows: list[int], text_rows: list[int], normalize: bool
    ) -> tuple[np.ndarray, int]:
        texts = [inputs[i] for i in text_rows]
        vectors = np.empty((len(inputs), self.dimension), dtype=np.float32)
        tokens = 0
        if image_rows:
            vectors[image_rows] = await self._embed_checked_images([inputs[i] for i in image_rows], normalize)
        if texts:
            # On the model's worker, like every other call of the encoder: a fast tokenizer rewrites its padding
            # and truncation state on each call, so two threads tokenizing at once break each other's calls.
            counting = asyncio.get_running_loop().run_in_executor(
                self.model_worker, self.text_encoder.count_tokens, texts
            )
            vectors[text_rows], tokens = await asyncio.gather(self._embed_checked_texts(texts, normalize), counting)
        return vectors, tokens

    def pair_probabilities(self, cosine: np.ndarray) -> np.ndarray:
        self._require_images()
        raise NotImplementedError  # models that read images override this

    async def _embed_checked_texts(self, texts: Sequence[str], normalize: bool) -> np.ndarray:
        return stack_rows(await self.text_batcher.submit(list(texts)), normalize)

    async def _embed_checked_images(self, images: Sequence[EncodedImage], normalize: bool) -> np.ndarray:
        raise NotImplementedError  # models that read images override this

    def _require_images(self) -> None:
        if "image" not in self.modalities:
            raise UnsupportedInput(
                f"this service ({self.model_name}) embeds text only; send images to an image service"
            )


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    # What np.linalg.norm(vectors, axis=-1, keepdims=True) computes for real rows, the same numbers, without its
    # checks: for a request's one vector those cost more than the arithmetic.
    norms = np.sqrt(np.add.reduce(vectors * vectors, axis=-1, keepdims=True))
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def stack_rows(rows: Sequence[np.ndarray], normalize: bool) -> np.ndarray:
    """A request's rows as one float32 matrix (np.array, not np.stack: the same rows, several times faster)."""
    matrix = np.array(rows).astype(np.float32, copy=False)
    return l2_normalize(matrix) if normalize else matrix
