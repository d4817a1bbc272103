"""Image (and same-space text) embeddings with SigLIP2 so400m-patch16-512: 1152-d vectors, port 6010.

    python siglip2_embed.py [--model PATH_OR_ID] [--port 6010] [--host 127.0.0.1] [--device auto] [--dtype auto]

Every flag also reads an environment variable (SIGLIP2_MODEL, SIGLIP2_PORT, EMBED_HOST, ...); see --help.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import Field, ValidationError
from starlette.datastructures import UploadFile as StarletteUploadFile

from common.app import create_app, ready_service
from common.batching import MicroBatcher
from common.config import ImageLimits, ServiceSettings, default_model
from common.device import describe_device, locate_model
from common.errors import InvalidRequestBody
from common.images import ImageSpec, is_image_data_uri, prepare_encoded_image
from common.model_source import display_name
from common.openai_api import add_openai_route
from common.responses import FastJSONResponse
from common.routes import add_text_routes, embedding_reply
from common.schemas import Body, EmbeddingResponse, EmbeddingsResponse
from common.server import run_service
from common.service import BatchedService, stack_rows

logger = logging.getLogger("siglip2")

HUB_ID = "google/siglip2-so400m-patch16-512"
LOCAL_PATH = "/mnt/hdd/models/siglip2-so400m-patch16-512"
# Names the embedding space: change it whenever the same input would get different numbers.
EMBEDDING_VERSION = "1.0"
DOWNLOAD_HELP = (
    f"    huggingface-cli download {HUB_ID} --local-dir {LOCAL_PATH}\n"
    f"    # or: modelscope download {HUB_ID} --local_dir {LOCAL_PATH}"
)


class Siglip2Settings(ImageLimits, ServiceSettings):
    service_env_prefix: ClassVar[str] = "SIGLIP2_"

    model: str = Field(
        default_factory=lambda: default_model(LOCAL_PATH, HUB_ID), description="SigLIP checkpoint folder or hub id"
    )
    port: int = Field(6010, ge=1, le=65535, description="TCP port")


class Siglip2Encoder:
    """A SigLIP checkpoint (``model_type "siglip"``) with pure batch methods; no HTTP, no asyncio."""

    def __init__(self, source: str, device: torch.device, dtype: torch.dtype, compile_model: bool = False) -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, SiglipModel

        config = AutoConfig.from_pretrained(source)
        if config.model_type != "siglip":
            raise ValueError(
                f"{source} is a {config.model_type!r} model; this service needs a fixed-resolution SigLIP/SigLIP2 "
                "checkpoint (model_type 'siglip', e.g. google/siglip2-so400m-patch16-512)"
            )
        self.device = device
        self.dtype = dtype
        self.model = SiglipModel.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
        self.model = self.model.to(device).eval()  # type: ignore[arg-type]
        if compile_model:
            # Image batches have one shape per batch size; text is always padded to text_length.
            self.model.vision_model.compile()
            self.model.text_model.compile()
        self.dimension: int = config.vision_config.hidden_size
        self.logit_scale = float(self.model.logit_scale.float().item())
        self.logit_bias = float(self.model.logit_bias.float().item())

        self.tokenizer = AutoTokenizer.from_pretrained(source)
        # Right padding: the text tower pools the last position and was trained on right-padded text
        # (transformers 5's Gemma tokenizer pads left unless told otherwise).
        self.tokenizer.padding_side = "right"
        self.text_length: int = config.text_config.max_position_embeddings  # 64 for SigLIP2

        processor = AutoImageProcessor.from_pretrained(source)
        size = processor.size
        self.input_height: int = size["height"]
        self.input_width: int = size["width"]
        self.resample = Image.Resampling(int(processor.resample))
        self.rescale_factor = float(processor.rescale_factor) if processor.do_rescale else 1.0
        mean = processor.image_mean if processor.do_normalize else [0.0, 0.0, 0.0]
        std = processor.image_std if processor.do_normalize else [1.0, 1.0, 1.0]
        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def image_spec(self, max_pixels: int, jpeg_draft: bool) -> ImageSpec:
        return ImageSpec(self.input_height, self.input_width, self.resample, max_pixels, jpeg_draft)

    @torch.inference_mode()
    def embed_images(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 H x W x 3 arrays at the input size -> raw (unnormalised) image vectors, float32."""
        batch = torch.from_numpy(np.stack(pixels)).to(self.device, non_blocking=True)
        # Rescale and normalise on the device, in float32 as the reference processor does, then cast.
        values = batch.permute(0, 3, 1, 2).float() * self.rescale_factor
        values = ((values - self._mean) / self._std).to(self.dtype)
        features = self.model.get_image_features(pixel_values=values).pooler_output
        return features.float().cpu().numpy()

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        # Lowercase ourselves: the checkpoint's Gemma tokenizer does not, and the model was trained on lowercase.
        # Pad to exactly text_length and pass input_ids only: the tower pools the last position.
        encoded = self.tokenizer(
            [text.lower() for text in texts],
            padding="max_length",
            max_length=self.text_length,
            truncation=True,
            return_tensors="pt",
        )
        return encoded["input_ids"]

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Real (non-padding) tokens the text tower reads, for the OpenAI route's usage."""
        encoded = self.tokenizer([text.lower() for text in texts], truncation=True, max_length=self.text_length)
        return sum(len(ids) for ids in encoded["input_ids"])

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> raw text vectors in the image space, float32."""
        input_ids = self.tokenize(texts).to(self.device)
        features = self.model.get_text_features(input_ids=input_ids).pooler_output
        return features.float().cpu().numpy()


class Siglip2Service(BatchedService):
    """The loaded model behind the routes: decoding pool, one batcher for images and one for texts."""

    def __init__(self, settings: Siglip2Settings, encoder: Siglip2Encoder, device_label: str) -> None:
        super().__init__(settings)
        self.settings: Siglip2Settings = settings
        self.encoder = encoder
        self.model_name = display_name(settings.model)
        self.dimension = encoder.dimension
        self.version = EMBEDDING_VERSION
        self.device = device_label
        self.image_spec = encoder.image_spec(settings.max_image_pixels, settings.jpeg_draft)
        self.decode_pool = ThreadPoolExecutor(
            max_workers=settings.decode_threads or os.cpu_count() or 1, thread_name_prefix="decode"
        )
        self.image_batcher: MicroBatcher[np.ndarray, np.ndarray] = self.make_batcher(encoder.embed_images, "images")
        self.text_batcher: MicroBatcher[str, np.ndarray] = self.make_batcher(encoder.embed_texts, "texts")

    async def stop(self) -> None:
        await super().stop()
        self.decode_pool.shutdown(wait=True)

    async def embed_images(self, images: Sequence[bytes | str], normalize: bool) -> np.ndarray:
        """Image files as bytes, or as base64 text (raw or data URI); decoded in the pool, never on the loop."""
        self.check_count(len(images), "images")
        loop = asyncio.get_running_loop()
        limit = self.settings.max_image_bytes
        pixels = await asyncio.gather(
            *(
                loop.run_in_executor(self.decode_pool, prepare_encoded_image, item, self.image_spec, limit)
                for item in images
            )
        )
        return stack_rows(await self.image_batcher.submit(pixels), normalize)

    async def embed_texts(self, texts: Sequence[str], normalize: bool) -> np.ndarray:
        self.check_texts(texts)
        return stack_rows(await self.text_batcher.submit(list(texts)), normalize)

    async def embed_inputs(self, inputs: Sequence[str], normalize: bool) -> tuple[np.ndarray, int]:
        """The OpenAI route's inputs: data:image/... URIs are images, everything else is SigLIP text."""
        self.check_count(len(inputs), "inputs")
        image_rows = [i for i, text in enumerate(inputs) if is_image_data_uri(text)]
        text_rows = [i for i, text in enumerate(inputs) if not is_image_data_uri(text)]
        images = [inputs[i] for i in image_rows]
        texts = [inputs[i] for i in text_rows]
        vectors = np.empty((len(inputs), self.dimension), dtype=np.float32)
        tokens = 0
        if images:
            vectors[image_rows] = await self.embed_images(images, normalize)
        if texts:
            vectors[text_rows], tokens = await asyncio.gather(
                self.embed_texts(texts, normalize), asyncio.to_thread(self.encoder.count_tokens, texts)
            )
        return vectors, tokens

    def probabilities(self, cosine: np.ndarray) -> np.ndarray:
        """SigLIP's pair probability: sigmoid(cos * exp(logit_scale) + logit_bias), scalars from the checkpoint."""
        logits = cosine * np.exp(self.encoder.logit_scale) + self.encoder.logit_bias
        return 1.0 / (1.0 + np.exp(-logits))

    def info(self) -> dict[str, Any]:
        spec = self.image_spec
        return {
            "model": self.model_name,
            "model_path": self.settings.model,
            "dimension": self.dimension,
            "version": self.version,
            "device": self.device,
            "dtype": str(self.encoder.dtype).removeprefix("torch."),
            "image": {
                "input_size": [spec.height, spec.width],
                "resample": spec.resample.name.lower(),
                "jpeg_draft": spec.jpeg_draft,
            },
            "text": {"lowercase": True, "max_tokens": self.encoder.text_length, "padding": "max_length, right"},
            "logit_scale": self.encoder.logit_scale,
            "logit_bias": self.encoder.logit_bias,
        }


# ---------------------------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------------------------

router = APIRouter()
Service = Depends(ready_service)
add_text_routes(router, "SigLIP text tower, same space as the images:")
add_openai_route(router)


class EmbedImageBase64Request(Body):
    image_base64: str = Field(min_length=1, description="raw base64 or a data:image/...;base64, URI")


class EmbedImagesBase64Request(Body):
    images_base64: list[str] = Field(min_length=1)


async def _read_uploads(files: Sequence[StarletteUploadFile], service: Siglip2Service) -> list[bytes]:
    service.check_count(len(files), "images")
    return [await file.read() for file in files]


@router.post("/embed/image", response_model=EmbeddingResponse, tags=["images"])
async def embed_image(
    request: Request,
    file: UploadFile = File(description="an image file"),
    normalize: bool = Form(True),
    service: Siglip2Service = Service,
) -> FastJSONResponse:
    """One image as multipart ``file`` -> ``embedding``."""
    vectors = await service.embed_images([await file.read()], normalize)
    return embedding_reply(service, request, vectors, single=True)


@router.post("/embed/image/base64", response_model=EmbeddingResponse, tags=["images"])
async def embed_image_base64(
    request: Request, body: EmbedImageBase64Request, service: Siglip2Service = Service
) -> FastJSONResponse:
    """``{"image_base64": "..."}`` (raw base64 or data URI) -> ``embedding``."""
    vectors = await service.embed_images([body.image_base64], body.normalize)
    return embedding_reply(service, request, vectors, single=True)


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
async def embed_images(request: Request, service: Siglip2Service = Service) -> FastJSONResponse:
    """Repeated multipart ``files`` (optional form ``normalize``), or JSON ``{"images_base64": [...]}`` ->
    ``embeddings`` in input order."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        limit = service.settings.max_items_per_request
        form = await request.form(
            max_files=limit + 1, max_fields=limit + 16, max_part_size=service.settings.max_body_bytes
        )
        files = [item for item in form.getlist("files") if isinstance(item, StarletteUploadFile)]
        if not files:
            raise InvalidRequestBody("files: send one or more images as repeated multipart fields named 'files'")
        normalize = _form_bool(form.get("normalize"), default=True)
        images: Sequence[bytes | str] = await _read_uploads(files, service)
    elif content_type != "application/json" and not content_type.endswith("+json"):
        raise InvalidRequestBody(
            f"Content-Type {content_type or 'missing'}: send multipart/form-data 'files' or application/json "
            '{"images_base64": [...]}'
        )
    else:
        try:
            body = EmbedImagesBase64Request.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        images, normalize = body.images_base64, body.normalize
    vectors = await service.embed_images(images, normalize)
    return embedding_reply(service, request, vectors, single=False)


def _form_bool(value: object, default: bool) -> bool:
    if value is None:
        return default
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise InvalidRequestBody(f"normalize: expected true or false, got {text[:20]!r}")


def _parse_texts(values: Sequence[str]) -> list[str]:
    """The German seed sends one field holding a JSON array; repeated plain fields work too."""
    texts: list[str] = []
    for value in values:
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                parsed = json.loads(stripped)
            except json.JSONDecodeError:
                raise InvalidRequestBody("texts: not a valid JSON array of strings") from None
            if not isinstance(parsed, list) or not all(isinstance(t, str) for t in parsed):
                raise InvalidRequestBody("texts: expected a JSON array of strings")
            texts.extend(parsed)
        else:
            texts.append(value)
    if not texts or any(not t for t in texts):
        raise InvalidRequestBody("texts: give one or more non-empty texts")
    return texts


async def _cosine(service: Siglip2Service, files: Sequence[StarletteUploadFile], texts: list[str]) -> np.ndarray:
    datas = await _read_uploads(files, service)
    images, text_vectors = await asyncio.gather(service.embed_images(datas, True), service.embed_texts(texts, True))
    return text_vectors @ images.T


@router.post("/similarity", tags=["cross-modal"])
async def similarity(
    request: Request,
    files: list[UploadFile] = File(description="images"),
    texts: list[str] = Form(description='a JSON array string such as ["a cat", "a dog"], or repeated fields'),
    service: Siglip2Service = Service,
) -> FastJSONResponse:
    """Texts x images: ``similarities`` (SigLIP probabilities) and ``cosine``, one row per text."""
    parsed = _parse_texts(texts)
    service.check_texts(parsed)  # before any image is decoded
    cosine = await _cosine(service, files, parsed)
    request.state.items = len(files) + len(parsed)
    return FastJSONResponse(
        {
            "similarities": service.probabilities(cosine),
            "cosine": cosine,
            "texts": parsed,
            "filenames": [file.filename for file in files],
            "model": service.model_name,
            "version": service.version,
        }
    )


@router.post("/rank", tags=["cross-modal"])
async def rank(
    request: Request,
    files: list[UploadFile] = File(description="images to rank"),
    query: str = Form(min_length=1, description="the text to rank the images by"),
    service: Siglip2Service = Service,
) -> FastJSONResponse:
    """Images ranked by a text query, best first."""
    cosine = (await _cosine(service, files, [query]))[0]
    scores = service.probabilities(cosine)
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
    return FastJSONResponse(
        {"query": query, "rankings": rankings, "model": service.model_name, "version": service.version}
    )


# ---------------------------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------------------------


def load_service(settings: Siglip2Settings) -> Siglip2Service:
    """Resolve, load and warm up the model (runs in a thread at start-up)."""
    source, device, dtype = locate_model(settings, DOWNLOAD_HELP)
    encoder = Siglip2Encoder(source, device, dtype, compile_model=settings.compile)
    encoder.embed_images([np.zeros((encoder.input_height, encoder.input_width, 3), np.uint8)])  # warm-up
    encoder.embed_texts(["warm-up"])
    return Siglip2Service(settings, encoder, describe_device(device))


def build_app(settings: Siglip2Settings, load: Callable[[], Siglip2Service] | None = None) -> FastAPI:
    """The FastAPI app; ``load`` replaces model loading in tests (a fake or a tiny real service)."""
    return create_app(
        title="SigLIP2 image and text embeddings",
        settings=settings,
        load_service=load or (lambda: load_service(settings)),
        router=router,
    )


def main(argv: list[str] | None = None) -> int:
    return run_service(Siglip2Settings, build_app, download_help=DOWNLOAD_HELP, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
