"""The shared half of every loaded model behind the routes: its identity, the input checks done once per request, and
the text and OpenAI-input paths both services share, run through the model's runtime (common.runtime: worker,
batchers, residency). A model's own service class adds what is specific to it (images, pair probabilities, details
for /info)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from common.batching import MicroBatcher
from common.config import Modality, ServiceSettings, limit_hint
from common.contract import ModelInfo
from common.errors import InvalidRequestBody, PayloadTooLarge, TooManyItems
from common.loading import has_random_weights
from common.precision import GIVEN_WITH_THE_ENCODER, dtype_name
from common.residency import Releasable
from common.runtime import ModelRuntime


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
    """Satisfies ``common.contract.EmbeddingModel``; a model that reads images adds them in its subclass
    (``common.contract.ImageModel``)."""

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
        text_cost: Callable[[Any], int] | None = None,
        max_text_batch_cost: int | None = None,
    ) -> None:
        """``dtype_reason``: why the encoder computes in its dtype (``common.precision.pick_dtype``), for /info.
        ``run_texts``: the batch method the text batcher runs (default: the encoder's ``embed_texts``); a model
        whose text batches carry other kinds of items too (per-token states) passes its own. ``text_cost`` and
        ``max_text_batch_cost``: the text batches' budget (``MicroBatcher``)."""
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
        self.runtime = ModelRuntime(settings, encoder, encoder.device)
        self.text_batcher: MicroBatcher[Any, Any] = self.runtime.batcher(
            run_texts or encoder.embed_texts, "texts", cost=text_cost, max_batch_cost=max_text_batch_cost
        )

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
        self.check_text_contents(texts)

    def check_text_contents(self, texts: Sequence[str]) -> None:
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
        async with self.runtime.residency.in_use():
            return await self.embed_checked_texts(texts, normalize)

    async def embed_inputs(self, inputs: Sequence[str], normalize: bool) -> tuple[np.ndarray, int]:
        """The OpenAI route's inputs (texts here; a model that reads images takes data:image/... URIs too) ->
        the vectors in input order and the number of text tokens the model read."""
        self.check_count(len(inputs), "inputs")
        self.check_text_contents(inputs)
        async with self.runtime.residency.in_use():
            return await self.embed_checked_input_texts(inputs, normalize)

    async def embed_checked_input_texts(self, texts: Sequence[str], normalize: bool) -> tuple[np.ndarray, int]:
        """Checked texts -> their vectors and the tokens the model read (counted on the model's worker)."""
        vectors, tokens = await asyncio.gather(
            self.embed_checked_texts(texts, normalize), self.runtime.run(self.text_encoder.count_tokens, texts)
        )
        return vectors, tokens

    async def embed_checked_texts(self, texts: Sequence[str], normalize: bool) -> np.ndarray:
        return stack_rows(await self.text_batcher.submit(list(texts)), normalize)


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
