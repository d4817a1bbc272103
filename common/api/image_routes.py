"""The image routes, mounted on services whose model reads images: single and batch embedding (multipart uploads,
or base64 in JSON as clients of the Quadux SigLIP API send it) and the cross-modal ``/similarity`` and ``/rank``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import UploadFile as StarletteUploadFile

from common.api.app import ImageModelOf, form_limits
from common.api.json_body import JSONBodyRoute, refuse_long_lists
from common.api.schemas import (
    EmbeddingResponse,
    EmbeddingsResponse,
    EmbedImageBase64Request,
    EmbedImagesBase64Request,
    FastJSONResponse,
    embedding_reply,
)
from common.contract import EncodedImage
from common.errors import InvalidRequestBody

router = APIRouter(route_class=JSONBodyRoute)

# How a JSON array of strings starts: such a value that does not parse is a broken array, not a text.
_JSON_ARRAY_START = re.compile(r"\[\s*[\"\[\]]")

# FastAPI's own reading of a boolean form field, for the route that parses its form by hand.
_FORM_BOOL = TypeAdapter(bool)


def form_bool(value: object, name: str, default: bool) -> bool:
    if value is None:
        return default
    try:
        return _FORM_BOOL.validate_python(value)
    except ValidationError as exc:
        raise RequestValidationError([{**err, "loc": ("body", name)} for err in exc.errors()]) from None


async def read_uploads(files: Sequence[StarletteUploadFile]) -> list[bytes]:
    return [await file.read() for file in files]


@router.post("/embed/image", response_model=EmbeddingResponse, tags=["images"])
async def embed_image(
    request: Request,
    model: ImageModelOf,
    file: UploadFile | None = File(None, description="an image file"),
    image_base64: str | None = Form(
        None, description="instead of a file: the image as base64 (the form clients of the Quadux SigLIP API send)"
    ),
    normalize: bool = Form(True),
) -> FastJSONResponse:
    """One image as multipart ``file`` (or form field ``image_base64``) -> ``embedding``."""
    if (file is None) == (image_base64 is None):
        raise InvalidRequestBody("send one image: a multipart file field 'file', or a form field 'image_base64'")
    image: EncodedImage = await file.read() if file is not None else image_base64 or ""
    vectors = await model.embed_images([image], normalize)
    return embedding_reply(model, request, vectors, single=True)


@router.post("/embed/image/base64", response_model=EmbeddingResponse, tags=["images"])
async def embed_image_base64(request: Request, body: EmbedImageBase64Request, model: ImageModelOf) -> FastJSONResponse:
    """``{"image_base64": "..."}`` (raw base64 or data URI) -> ``embedding``."""
    vectors = await model.embed_images([body.image_base64], body.normalize)
    return embedding_reply(model, request, vectors, single=True)


# /embed/images reads its body by hand (multipart or JSON): its two body forms, for the OpenAPI schema.
_IMAGES_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "normalize": {"type": "boolean", "default": True},
                    },
                }
            },
            "application/json": {"schema": EmbedImagesBase64Request.model_json_schema()},
        },
    }
}


@router.post("/embed/images", response_model=EmbeddingsResponse, tags=["images"], openapi_extra=_IMAGES_BODY_DOC)
async def embed_images(request: Request, model: ImageModelOf) -> FastJSONResponse:
    """Repeated multipart ``files`` (optional form ``normalize``), or JSON ``{"images_base64": [...]}`` ->
    ``embeddings`` in input order."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    images: Sequence[EncodedImage]
    if content_type == "multipart/form-data":
        form = await request.form(**form_limits(model.settings))
        files = [item for item in form.getlist("files") if isinstance(item, StarletteUploadFile)]
        if not files:
            raise InvalidRequestBody("files: send one or more images as repeated multipart fields named 'files'")
        normalize = form_bool(form.get("normalize"), "normalize", default=True)
        images = await read_uploads(files)
    elif content_type != "application/json" and not content_type.endswith("+json"):
        raise InvalidRequestBody(
            f"Content-Type {content_type or 'missing'}: send multipart/form-data 'files' or application/json "
            '{"images_base64": [...]}'
        )
    else:
        try:
            body = EmbedImagesBase64Request.model_validate(await request.json())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        images, normalize = body.images_base64, body.normalize
    vectors = await model.embed_images(images, normalize)
    return embedding_reply(model, request, vectors, single=False)


def parse_texts(values: Sequence[str], max_items: int) -> list[str]:
    """Clients of the Quadux SigLIP API send one field holding a JSON array; repeated plain fields work too, and so
    does one plain text, even one that starts with a bracket ("[draft] a cat").

    A value that parses as a JSON array must hold strings (at most ``max_items``: 413 before anything else); one
    that does not parse is a text, unless it starts like an array of strings (``[`` then ``"``, ``[`` or ``]``),
    which is a 422. orjson bounds the nesting (1024) and the size of numbers, so no value reaches a recursion or
    digit limit (the standard library raised those as a 500)."""
    texts: list[str] = []
    for value in values:
        stripped = value.strip()
        if not stripped.startswith("["):
            texts.append(value)
            continue
        try:
            parsed = orjson.loads(stripped)
        except orjson.JSONDecodeError:
            if _JSON_ARRAY_START.match(stripped):
                raise InvalidRequestBody("texts: not a valid JSON array of strings") from None
            texts.append(value)
            continue
        refuse_long_lists(parsed, max_items)
        if not isinstance(parsed, list) or not all(isinstance(t, str) for t in parsed):
            raise InvalidRequestBody("texts: expected a JSON array of strings")
        texts.extend(parsed)
    if not texts or any(not t for t in texts):
        raise InvalidRequestBody("texts: give one or more non-empty texts")
    return texts


@router.post("/similarity", tags=["cross-modal"])
async def similarity(
    request: Request,
    model: ImageModelOf,
    files: list[UploadFile] = File(description="images"),
    texts: list[str] = Form(description='a JSON array string such as ["a cat", "a dog"], or repeated fields'),
    return_embeddings: bool = Form(
        False, description="also return text_embeddings and image_embeddings (off: keeps the response small)"
    ),
) -> FastJSONResponse:
    """Texts x images: ``similarities`` (the model's pair probabilities) and ``cosine``, one row per text."""
    parsed = parse_texts(texts, model.settings.max_items_per_request)
    text_vectors, image_vectors = await model.embed_texts_and_images(parsed, await read_uploads(files))
    cosine = text_vectors @ image_vectors.T
    request.state.items = len(files) + len(parsed)
    body: dict[str, Any] = {
        "similarities": model.pair_probabilities(cosine),
        "cosine": cosine,
        "texts": parsed,
        "filenames": [file.filename for file in files],
        "model": model.model_name,
        "version": model.version,
    }
    if return_embeddings:
        body |= {"text_embeddings": text_vectors, "image_embeddings": image_vectors, "dimensions": model.dimension}
    return FastJSONResponse(body)


@router.post("/rank", tags=["cross-modal"])
async def rank(
    request: Request,
    model: ImageModelOf,
    files: list[UploadFile] = File(description="images to rank"),
    query: str = Form(min_length=1, description="the text to rank the images by"),
) -> FastJSONResponse:
    """Images ranked by a text query, best first."""
    text_vectors, image_vectors = await model.embed_texts_and_images([query], await read_uploads(files))
    cosine = (text_vectors @ image_vectors.T)[0]
    scores = model.pair_probabilities(cosine)
    order = np.argsort(-cosine, kind="stable")
    request.state.items = len(files) + 1
    rankings = [
        {
            "index": int(index),
            "filename": files[index].filename,
            "score": float(scores[index]),
            "cosine": float(cosine[index]),
            "rank": position + 1,
        }
        for position, index in enumerate(order)
    ]
    return FastJSONResponse({"query": query, "rankings": rankings, "model": model.model_name, "version": model.version})
