"""``POST /v1/embeddings``, OpenAI-compatible, so the official ``openai`` client (and everything built on it) works
with ``base_url="http://host:port/v1"``.

The official client asks for ``encoding_format="base64"`` by default: little-endian float32 bytes, base64-encoded.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Annotated, Literal, Protocol

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from common.app import ready_service
from common.responses import FastJSONResponse

Input = Annotated[StrictStr, Field(min_length=1)]


class OpenAIEmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # "user", "dimensions" etc. are accepted and ignored

    input: Input | Annotated[list[Input], Field(min_length=1)] = Field(
        description="a string or a list of strings (on the image service, data:image/...;base64 URIs are images)"
    )
    model: str | None = Field(None, description="accepted and reported back; the service has one model")
    encoding_format: Literal["float", "base64"] = "float"
    normalize: StrictBool = Field(True, description="extension: false returns raw model outputs")


class InputEmbedder(Protocol):
    model_name: str

    async def embed_inputs(self, inputs: Sequence[str], normalize: bool) -> tuple[np.ndarray, int]:
        """Vectors in input order, and the number of tokens the model read."""
        ...


def encode_base64(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def add_openai_route(router: APIRouter) -> None:
    @router.post("/v1/embeddings", tags=["openai"], summary="OpenAI-compatible embeddings")
    async def create_embeddings(
        request: Request, body: OpenAIEmbeddingsRequest, service: InputEmbedder = Depends(ready_service)
    ) -> FastJSONResponse:
        inputs = [body.input] if isinstance(body.input, str) else body.input
        vectors, tokens = await service.embed_inputs(inputs, body.normalize)
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
                "model": body.model or service.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
