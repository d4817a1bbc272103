"""Image (and same-space text) embeddings with SigLIP2 so400m-patch16-512: 1152-d vectors, port 6010.

    python siglip2_embed.py [--model PATH_OR_ID] [--port 6010] [--host 127.0.0.1] [--device auto] [--dtype auto]

Every flag also reads an environment variable (SIGLIP2_MODEL, SIGLIP2_PORT, EMBED_HOST, ...); see --help.
This file holds what is specific to SigLIP: its settings, the encoder (pure batch methods), the service that puts
batching and image decoding around it, and ``load``. The routes and the server are shared, in ``common/``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from common.batching import MicroBatcher
from common.config import ImageLimits, ServiceSettings, default_model
from common.contract import EncodedImage
from common.decoding import DecodePool
from common.identity import known_siglip_name, weights_fingerprint
from common.images import ImageSpec
from common.loading import (
    describe_device,
    display_name,
    explain_broken_weights,
    locate_model,
    read_checkpoint_floats,
    read_config,
    resolve_model_source,
)
from common.precision import GIVEN_WITH_THE_ENCODER
from common.residency import SwappableWeights
from common.server import ServiceDefinition
from common.service import BatchedService, stack_rows
from common.services import SERVICES
from embed_client.formats import is_image_data_uri

if TYPE_CHECKING:
    from transformers import SiglipModel

HUB_ID = "google/siglip2-so400m-patch16-512"
LOCAL_PATH = "/mnt/hdd/models/siglip2-so400m-patch16-512"
# Names the embedding space: change it whenever the same input would get different numbers.
EMBEDDING_VERSION = "1.0"
DOWNLOAD_HELP = (
    f"    hf download {HUB_ID} --local-dir {LOCAL_PATH}\n"
    f"    # or: modelscope download {HUB_ID} --local_dir {LOCAL_PATH}"
)


class Siglip2Settings(ImageLimits, ServiceSettings):
    service_env_prefix: ClassVar[str] = SERVICES["siglip2"].env_prefix
    # Its image and text vectors hold in bfloat16 (cosine 0.99999 and 0.99993 to float32 on the full-size
    # architecture), but /similarity's probabilities would not: the pairs' cosines moved by up to 9e-4, and near
    # p = 0.5 a probability's slope is exp(logit_scale) / 4 (about 29 for a trained so400m): up to 0.025 where 1e-3
    # is the bound (a random checkpoint, whose logit scale is 0, cannot show it). On a GPU it runs in bfloat16, as
    # it always has.
    cpu_float32_because: ClassVar[str | None] = (
        "SigLIP's pair probabilities (/similarity, /rank) would move by up to 0.025 in bfloat16; "
        "--dtype bfloat16 embeds at its speed where only the vectors matter (indexing)"
    )

    model: str = Field(
        default_factory=lambda: default_model(LOCAL_PATH, HUB_ID),
        description=f"SigLIP checkpoint folder or hub id (default: {LOCAL_PATH} if that folder exists, else {HUB_ID})",
    )
    port: int = Field(SERVICES["siglip2"].port, ge=1, le=65535, description="TCP port")


class Siglip2Encoder(SwappableWeights["SiglipModel"]):
    """A SigLIP checkpoint (``model_type "siglip"``) with pure batch methods; no HTTP, no asyncio."""

    def __init__(
        self,
        source: str,
        device: torch.device,
        dtype: torch.dtype,
        compile_model: bool = False,
        *,
        compile_backend: str = "inductor",
    ) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer

        config = read_config(
            source,
            None,
            "siglip",
            f"a fixed-resolution SigLIP/SigLIP2 checkpoint (model_type 'siglip', e.g. {HUB_ID})",
        )
        self.source = source
        self.device = device
        self.dtype = dtype
        self.compile_model = compile_model
        self.compile_backend = compile_backend
        self.model = self.load_model()
        self.fingerprint = weights_fingerprint(self.weight_folders())
        self.known_name = known_siglip_name(config)
        self.dimension: int = config.vision_config.hidden_size
        # The pair-probability scalars in float32, as the checkpoint has them: cast to bfloat16 with the model, the
        # logit scale 4.7 would become 4.6875 (exp 1.2 % low) and every /similarity probability would be off.
        stored = read_checkpoint_floats(source, ["logit_scale", "logit_bias"])
        self.logit_scale = stored.get("logit_scale", float(self.model.logit_scale.float().item()))
        self.logit_bias = stored.get("logit_bias", float(self.model.logit_bias.float().item()))

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

    def warm_up(self) -> None:
        """One batch of 1 and one of 2 through each tower: a compiled model compiles every graph it needs now, at
        start-up (batch 1 is always a graph of its own; any other size then shares the dynamic one), not on the
        first multi-item batch of a live request."""
        blank = np.zeros((self.input_height, self.input_width, 3), np.uint8)
        for count in (1, 2):
            self.embed_images([blank] * count)
            self.embed_texts(["warm-up"] * count)

    def load_model(self) -> SiglipModel:
        """The weights from the folder onto the device (at start-up, and on a wake after an unload)."""
        from transformers import SiglipModel

        model = SiglipModel.from_pretrained(self.source, dtype=self.dtype, attn_implementation="sdpa")
        model = model.to(self.device).eval()  # type: ignore[arg-type]
        if self.compile_model:
            # Only the batch size varies (images are at the input size, text is padded to text_length). torch.compile
            # specialises its first graph on it; the second batch size it sees makes it dynamic: warm_up runs both.
            model.vision_model.compile(backend=self.compile_backend)
            model.text_model.compile(backend=self.compile_backend)
        return model

    def weight_folders(self) -> list[Path]:
        return [Path(self.source)]

    def image_spec(self, max_pixels: int, jpeg_draft: bool, max_decoded_pixels: int) -> ImageSpec:
        return ImageSpec(self.input_height, self.input_width, self.resample, max_pixels, jpeg_draft, max_decoded_pixels)

    @torch.inference_mode()
    def embed_images(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 H x W x 3 arrays at the input size -> raw (unnormalised) image vectors, float32."""
        # A plain (synchronous) copy: non_blocking from pageable memory gains nothing on CUDA (it is synchronous
        # there anyway), and on MPS the copy may run after the np.stack temporary is freed (wrong pixels, silently).
        batch = torch.from_numpy(np.stack(pixels)).to(self.device)
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
    """The loaded model behind the routes: a decoding pool, one batcher for images and one for texts."""

    def __init__(
        self,
        settings: Siglip2Settings,
        encoder: Siglip2Encoder,
        device_label: str,
        dtype_reason: str = GIVEN_WITH_THE_ENCODER,
    ) -> None:
        super().__init__(
            settings,
            encoder,
            # A known checkpoint by its config's name, whatever its folder is called; another by its folder.
            model_name=encoder.known_name or display_name(settings.model),
            version=EMBEDDING_VERSION,  # the same space in every dtype: bfloat16 only rounds it
            device=device_label,
            dtype_reason=dtype_reason,
        )
        self.settings: Siglip2Settings = settings
        self.encoder = encoder
        self.image_spec = encoder.image_spec(
            settings.max_image_pixels, settings.jpeg_draft, settings.max_decoded_pixels
        )
        self.decoder = DecodePool(
            self.image_spec, settings.max_image_bytes, threads=settings.decode_threads or os.cpu_count() or 1
        )
        self.image_batcher: MicroBatcher[np.ndarray, np.ndarray] = self.runtime.batcher(encoder.embed_images, "images")
        self.runtime.on_stop(self.decoder.shutdown)

    async def embed_images(self, images: Sequence[EncodedImage], normalize: bool) -> np.ndarray:
        self.check_count(len(images), "images")
        async with self.runtime.residency.in_use():
            return await self._embed_checked_images(images, normalize)

    async def embed_texts_and_images(
        self, texts: Sequence[str], images: Sequence[EncodedImage]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Both lists at once (texts checked before any image is decoded), L2-normalised, for cross-modal scores."""
        self.check_texts(texts)
        self.check_count(len(images), "images")
        async with self.runtime.residency.in_use():
            text_vectors, image_vectors = await asyncio.gather(
                self.embed_checked_texts(texts, True), self._embed_checked_images(images, True)
            )
        return text_vectors, image_vectors

    async def embed_inputs(self, inputs: Sequence[str], normalize: bool) -> tuple[np.ndarray, int]:
        """The OpenAI route: data:image/... URIs are images, everything else is text."""
        self.check_count(len(inputs), "inputs")
        image_rows = [i for i, item in enumerate(inputs) if is_image_data_uri(item)]
        text_rows = sorted(set(range(len(inputs))) - set(image_rows))
        texts = [inputs[i] for i in text_rows]
        self.check_text_contents(texts)
        vectors = np.empty((len(inputs), self.dimension), dtype=np.float32)
        tokens = 0
        async with self.runtime.residency.in_use():
            if image_rows:
                vectors[image_rows] = await self._embed_checked_images([inputs[i] for i in image_rows], normalize)
            if texts:
                vectors[text_rows], tokens = await self.embed_checked_input_texts(texts, normalize)
        return vectors, tokens

    async def _embed_checked_images(self, images: Sequence[EncodedImage], normalize: bool) -> np.ndarray:
        """Image files as bytes, or as base64 text (raw or data URI); decoded in the pool, never on the loop."""
        pixels = await self.decoder.decode(images)
        return stack_rows(await self.image_batcher.submit(pixels), normalize)

    def pair_probabilities(self, cosine: np.ndarray) -> np.ndarray:
        """SigLIP's pair probability: sigmoid(cos * exp(logit_scale) + logit_bias), scalars from the checkpoint."""
        logits = cosine * np.exp(self.encoder.logit_scale) + self.encoder.logit_bias
        return 1.0 / (1.0 + np.exp(-logits))

    def details(self) -> dict[str, Any]:
        spec = self.image_spec
        return {
            # The keys clients of the Quadux SigLIP API read: both towers project into one space of this size.
            "text_dim": self.dimension,
            "vision_dim": self.dimension,
            "image_size": spec.height,
            "cross_modal": True,
            "image": {
                "input_size": [spec.height, spec.width],
                "resample": spec.resample.name.lower(),
                "jpeg_draft": spec.jpeg_draft,
            },
            "text": {"lowercase": True, "max_tokens": self.encoder.text_length, "padding": "max_length, right"},
            "logit_scale": self.encoder.logit_scale,
            "logit_bias": self.encoder.logit_bias,
        }


def model_identity(settings: Siglip2Settings) -> tuple[str, str]:
    """The name and fingerprint the service reports for ``settings.model``, from its folder without loading it (the
    bulk import records them beside its vectors, as the indexer records the service's)."""
    source = resolve_model_source(settings.model, download_help=DOWNLOAD_HELP)
    config = read_config(source, None, "siglip", f"a fixed-resolution SigLIP/SigLIP2 checkpoint (e.g. {HUB_ID})")
    return known_siglip_name(config) or display_name(settings.model), weights_fingerprint([Path(source)])


def load(settings: Siglip2Settings) -> Siglip2Service:
    """Resolve, load and warm up the model (runs in a thread at start-up)."""
    source, device, dtype = locate_model(settings, DOWNLOAD_HELP)
    with explain_broken_weights(source, DOWNLOAD_HELP):
        encoder = Siglip2Encoder(source, device, dtype.dtype, compile_model=settings.compile)
    encoder.warm_up()
    return Siglip2Service(settings, encoder, describe_device(device), dtype.reason)


SERVICE = ServiceDefinition(
    "SigLIP2 image and text embeddings", Siglip2Settings, load, DOWNLOAD_HELP, version_of=lambda _: EMBEDDING_VERSION
)
build_app, main = SERVICE.build_app, SERVICE.main

if __name__ == "__main__":
    raise SystemExit(main())
