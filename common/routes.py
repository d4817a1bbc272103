"""Routes and reply shapes both services share: ``/embed/text`` and ``/embed/texts`` (the seeds' contract)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from fastapi import APIRouter, Depends, Request

from common.app import ready_service
from common.responses import FastJSONResponse
from common.schemas import EmbeddingResponse, EmbeddingsResponse, EmbedTextRequest, EmbedTextsRequest


class TextEmbedder(Protocol):
    model_name: str
    dimension: int
    version: str

    async def embed_texts(self, texts: Sequence[str], normalize: bool) -> np.ndarray: ...


def embedding_reply(service: Any, request: Request, vectors: np.ndarray, single: bool) -> FastJSONResponse:
    """``{"embedding"|"embeddings", "dimension", "model", "version"}``; also counts items for the access log."""
    request.state.items = len(vectors)
    key, value = ("embedding", vectors[0]) if single else ("embeddings", vectors)
    return FastJSONResponse(
        {key: value, "dimension": service.dimension, "model": service.model_name, "version": service.version}
    )


def add_text_routes(router: APIRouter, description: str) -> None:
    @router.post(
        "/embed/text",
        response_model=EmbeddingResponse | EmbeddingsResponse,
        tags=["texts"],
        summary="Embed one text (or a list)",
        description=f'{description} `{{"text"}}` -> `embedding`, `{{"texts"}}` -> `embeddings`.',
    )
    async def embed_text(
        request: Request, body: EmbedTextRequest, service: TextEmbedder = Depends(ready_service)
    ) -> FastJSONResponse:
        texts = [body.text] if body.text is not None else body.texts or []
        vectors = await service.embed_texts(texts, body.normalize)
        return embedding_reply(service, request, vectors, single=body.text is not None)

    @router.post(
        "/embed/texts",
        response_model=EmbeddingsResponse,
        tags=["texts"],
        summary="Embed a list of texts",
        description=f'{description} `{{"texts": [...]}}` -> `embeddings`, in input order.',
    )
    async def embed_texts(
        request: Request, body: EmbedTextsRequest, service: TextEmbedder = Depends(ready_service)
    ) -> FastJSONResponse:
        vectors = await service.embed_texts(body.texts, body.normalize)
        return embedding_reply(service, request, vectors, single=False)
