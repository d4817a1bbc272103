"""Request and response bodies, the fast JSON response and the reply helper.

The shapes are a compatibility contract: ``{"text"}``/``{"texts"}`` -> ``{"embedding"|"embeddings", "dimension",
"model", "version"}`` as the existing indexers of these two services send and read them, ``image_base64`` and
``images_base64`` as clients of the Quadux SigLIP API send them, and OpenAI's embeddings API for everything built on
the official ``openai`` client.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from common.contract import EmbeddingModel

# Texts must be real strings (no numbers coerced to "1") and not empty.
Text = Annotated[StrictStr, Field(min_length=1)]
T = TypeVar("T")
NonEmpty = Annotated[T, Field(min_length=1)]


class FastJSONResponse(JSONResponse):
    """Serialises numpy vectors with orjson instead of through Python floats (several times faster)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


# -- requests -------------------------------------------------------------------------------------------------


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    normalize: StrictBool = Field(True, description="L2-normalise the vectors (false returns raw model outputs)")


class EmbedTextRequest(Body):
    """``{"text": "..."}`` -> ``embedding``; ``{"texts": [...]}`` -> ``embeddings`` (the Quadux SigLIP API's form)."""

    text: Text | None = None
    texts: list[Text] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> EmbedTextRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' (a string) or 'texts' (a list of strings)")
        return self


class EmbedTextsRequest(Body):
    texts: list[Text] = Field(min_length=1)


class EmbedImageBase64Request(Body):
    image_base64: str = Field(min_length=1, description="raw base64 or a data:image/...;base64, URI")


class EmbedImagesBase64Request(Body):
    images_base64: list[str] = Field(min_length=1)


class OpenAIEmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # "user" and other fields of the OpenAI API are accepted and ignored

    # Token ids (a list of ints, or of lists of ints) are valid in OpenAI's API; they are accepted by the schema
    # only so that the route can answer with one clear sentence instead of a list of type errors.
    input: Text | NonEmpty[list[Text]] | NonEmpty[list[StrictInt]] | NonEmpty[list[list[StrictInt]]] = Field(
        description="a string or a list of strings (on the image service, data:image/...;base64 URIs are images)"
    )
    model: str | None = Field(None, description="accepted and reported back; the service has one model")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(
        None, description="must be the model's own dimension if given: these vectors are not trained for truncation"
    )
    normalize: StrictBool = Field(True, description="extension: false returns raw model outputs")


# -- responses ------------------------------------------------------------------------------------------------


class EmbeddingResponse(BaseModel):
    embedding: list[float]
    dimension: int
    dimensions: int = Field(description="the same as dimension, under the name clients of the Quadux SigLIP API read")
    model: str
    version: str


class EmbeddingsResponse(BaseModel):
    embeddings: list[list[float]]
    dimension: int
    dimensions: int = Field(description="the same as dimension, under the name clients of the Quadux SigLIP API read")
    model: str
    version: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str


class ErrorResponse(BaseModel):
    """The one error envelope (OpenAI's): ``{"error": {"message", "type", "code"}}``."""

    error: ErrorDetail


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


# What any embedding route can answer besides 200, declared once for the OpenAPI schema.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("undecodable or unsupported input, or a Host name the service does not answer to"),
    401: _error("missing or wrong API key (when the service has one)"),
    403: _error("a post from a browser page of another origin (not in cors_origins)"),
    408: _error("the request body did not arrive within body_timeout_s"),
    413: _error("too large: body, image, pixels, text length or item count"),
    422: _error("the body does not match the route's schema"),
    429: _error("the queue is full; retry after Retry-After seconds"),
    503: _error(
        "not ready, shutting down, overloaded (timeout) or out of device memory; retry after Retry-After seconds"
    ),
}


def embedding_reply(model: EmbeddingModel, request: Request, vectors: np.ndarray, single: bool) -> FastJSONResponse:
    """``{"embedding"|"embeddings", "dimension", "dimensions", "model", "version"}``; also counts items for the
    access log."""
    request.state.items = len(vectors)
    key, value = ("embedding", vectors[0]) if single else ("embeddings", vectors)
    return FastJSONResponse(
        {
            key: value,
            "dimension": model.dimension,
            "dimensions": model.dimension,
            "model": model.model_name,
            "version": model.version,
        }
    )


def encode_base64(vector: np.ndarray) -> str:
    """OpenAI's ``encoding_format="base64"``: little-endian float32 bytes, base64-encoded."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
