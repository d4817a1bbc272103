"""The text routes every service has: ``/embed/text`` and ``/embed/texts`` (the request and response shapes the
existing indexers of these services use) and ``POST /v1/embeddings`` (OpenAI-compatible, so the official ``openai``
client works with ``base_url="http://host:port/v1"``; it asks for ``encoding_format="base64"`` by default)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from common.api.app import Model
from common.api.json_body import JSONBodyRoute
from common.api.schemas import (
    EmbeddingResponse,
    EmbeddingsResponse,
    EmbedTextRequest,
    EmbedTextsRequest,
    FastJSONResponse,
    OpenAIEmbeddingsRequest,
    embedding_reply,
    encode_base64,
)
from common.errors import InvalidInput

router = APIRouter(route_class=JSONBodyRoute)


@router.post(
    "/embed/text",
    response_model=EmbeddingResponse | EmbeddingsResponse,
    tags=["texts"],
    summary="Embed one text (or a list)",
)
async def embed_text(request: Request, body: EmbedTextRequest, model: Model) -> FastJSONResponse:
    """``{"text": "..."}`` -> ``embedding``; ``{"texts": [...]}`` -> ``embeddings``. On the image service the
    vectors are in the same space as the images."""
    texts = [body.text] if body.text is not None else body.texts or []
    vectors = await model.embed_texts(texts, body.normalize)
    return embedding_reply(model, request, vectors, single=body.text is not None)


@router.post("/embed/texts", response_model=EmbeddingsResponse, tags=["texts"], summary="Embed a list of texts")
async def embed_texts(request: Request, body: EmbedTextsRequest, model: Model) -> FastJSONResponse:
    """``{"texts": [...]}`` -> ``embeddings``, in input order."""
    vectors = await model.embed_texts(body.texts, body.normalize)
    return embedding_reply(model, request, vectors, single=False)


@router.post("/v1/embeddings", tags=["openai"], summary="OpenAI-compatible embeddings")
async def create_embeddings(request: Request, body: OpenAIEmbeddingsRequest, model: Model) -> FastJSONResponse:
    """``{"input": str | [str], "encoding_format"?: "float" | "base64"}`` -> OpenAI's list of embeddings. On the
    image service an input that is a ``data:image/...;base64,`` URI is an image."""
    if body.dimensions is not None and body.dimensions != model.dimension:
        raise InvalidInput(
            f"dimensions={body.dimensions} is not supported: this model's vectors have {model.dimension} dimensions "
            "and are not trained to be truncated; omit 'dimensions' or send "
            f"{model.dimension}"
        )
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not all(isinstance(item, str) for item in inputs):
        raise InvalidInput("input: token ids are not supported; send strings (a string or a list of strings)")
    texts = [item for item in inputs if isinstance(item, str)]
    vectors, tokens = await model.embed_inputs(texts, body.normalize)
    request.state.items = len(inputs)
    as_base64 = body.encoding_format == "base64"
    data = [
        {"object": "embedding", "index": index, "embedding": encode_base64(vector) if as_base64 else vector}
        for index, vector in enumerate(vectors)
    ]
    return FastJSONResponse(
        {
            "object": "list",
            "data": data,
            "model": body.model or model.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
