"""The one contract a loaded model satisfies: what the routes, the batching metrics, the app factory and the tests
rely on, whatever the model is.

A model states which inputs it embeds (``modalities``); asking it for another kind is a 400, never a silent
misuse (a data URI embedded as text, say). The encoder classes behind it stay pure (batch in, numpy out; no HTTP,
no asyncio); the class that satisfies this contract adds the input checks and decoding, and says what its runtime
(common.runtime) batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from common.config import Modality, ServiceSettings

if TYPE_CHECKING:
    import torch

    from common.runtime import ModelRuntime

# Raw base64 or a data:image/... URI (JSON routes), or the bytes of an uploaded file (multipart routes).
EncodedImage = bytes | str


class ModelInfo(BaseModel):
    """What a loaded model says about itself in ``GET /info``. Model-specific details (the image preprocessing,
    the text recipe, ...) are extra keys beside these."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="the model's display name; with version, it names the embedding space")
    model_path: str = Field(description="the folder or hub id it was loaded from")
    dimension: int = Field(description="length of every vector")
    version: str = Field(description="embedding-space version: vectors are comparable only with equal model+version")
    device: str
    dtype: str = Field(description="what the model computes in: float32, bfloat16 or float16")
    dtype_reason: str = Field(description="why that dtype: asked for, or what --dtype auto found on this device")
    modalities: list[Modality] = Field(description="which inputs this service embeds")
    tiny: bool = Field(description="true for the tiny random-weight test models: their vectors are meaningless")
    fingerprint: str = Field(
        description="of the model's files (configs, tokenizer, a sample of every weight tensor): the same for the "
        "same weights in any folder, another for other weights"
    )


class EmbeddingModel(Protocol):
    """A loaded model behind the HTTP routes: what it is, and its batch methods (checked, then run through its
    runtime, which the app starts, watches and stops)."""

    model_name: str
    dimension: int
    version: str
    device: str
    # Which inputs it embeds (its settings class says which).
    modalities: tuple[Modality, ...]
    # True for the tiny random-weight test models (a marker file in their folder): their vectors are meaningless.
    tiny: bool
    # Of the model's files (common.identity): with the version, what an index made by this model records.
    fingerprint: str
    # Its worker, batchers, residency and health.
    runtime: ModelRuntime

    @property
    def settings(self) -> ServiceSettings:
        """The limits the routes enforce come from here."""
        ...

    def info(self) -> ModelInfo: ...

    def check_count(self, count: int, what: str) -> None:
        """413 when one request carries more items than the limit allows."""
        ...

    def check_texts(self, texts: Sequence[str]) -> None:
        """413/422 for a text list that must not reach the model (count, length, invalid Unicode)."""
        ...

    async def embed_texts(self, texts: Sequence[str], normalize: bool) -> np.ndarray:
        """Texts -> ``(n, dimension)`` float32 in input order."""
        ...

    async def embed_inputs(self, inputs: Sequence[str], normalize: bool) -> tuple[np.ndarray, int]:
        """The OpenAI route's inputs -> vectors in input order, and the number of tokens the model read."""
        ...


class ImageModel(EmbeddingModel, Protocol):
    """A model that reads images too (``"image"`` in its modalities), in the same space as its texts."""

    async def embed_images(self, images: Sequence[EncodedImage], normalize: bool) -> np.ndarray:
        """Encoded images -> ``(n, dimension)`` float32 in input order."""
        ...

    async def embed_texts_and_images(
        self, texts: Sequence[str], images: Sequence[EncodedImage]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Both at once, L2-normalised, texts checked before any image is decoded (for cross-modal scores)."""
        ...

    def pair_probabilities(self, cosine: np.ndarray) -> np.ndarray:
        """Text/image cosine similarities -> the model's match probabilities."""
        ...


class TokenStatesModel(EmbeddingModel, Protocol):
    """A model that also hands out the per-token hidden states its text vectors are pooled from (``/embed/tokens``):
    what a diffusion pipeline conditions on, so that a generator beside the service needs no text encoder of its
    own."""

    @property
    def states_dtype(self) -> torch.dtype:
        """The dtype the model computes in: the states' own, unless a request asks for another."""
        ...

    @property
    def token_recipe(self) -> dict[str, str | int]:
        """What decides the states (layer, template, max_length): the answer names it."""
        ...

    async def embed_token_states(self, texts: Sequence[str], value_bytes: int) -> list[torch.Tensor]:
        """Per text ``[tokens, dimension]`` in ``states_dtype`` on the CPU, in input order; 413 before any work when
        the answer, at ``value_bytes`` a value, would be too large."""
        ...
