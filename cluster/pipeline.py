"""The Ray Data stages of a bulk import: file bytes -> pixels on CPU tasks, pixels -> unit vectors in a pool of
actors that each hold one ``Siglip2Encoder``.

The vectors are the service's: the same decoding (``common.images``), the same image spec read from the checkpoint,
the same encoder and the same L2 normalisation as ``POST /embed/image``. This module imports neither torch nor
transformers at the top, so decoding workers do not pay for them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import ray.data

from cluster.permanent import PERMANENT_LOAD_ERRORS, PermanentFailure
from cluster.source import Source, SourceFile
from common.errors import EmbedError
from common.images import ImageSpec, encoded_bytes, prepare_image
from embed_client.files import read_or_reason

if TYPE_CHECKING:
    from siglip2_embed import Siglip2Settings

logger = logging.getLogger(__name__)

# A decoding worker: the process itself (Python, Ray, PIL, pyarrow: ~350 MB measured) and one large image while it
# is decoded (a 24 MP JPEG at draft scale, a 50 MP PNG in full).
DECODE_WORKER_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class PoolOptions:
    actors: int  # encoder actors, each holding one copy of the model
    gpus_per_actor: float  # 0 on a CPU-only cluster; a fraction packs several actors on one GPU
    cpus_per_actor: float  # CPU reserved for each actor (its forward passes on a CPU-only cluster)
    batch_size: int  # images per decoding batch and per forward pass


def decode_memory(spec: ImageSpec, files: list[SourceFile], batch_size: int) -> int:
    """Memory a read-and-decode task reserves: the worker, and a batch of files with their pixels at the input size."""
    mean_file_bytes = sum(f.size for f in files) // max(1, len(files))
    return DECODE_WORKER_BYTES + batch_size * (mean_file_bytes + spec.height * spec.width * 3)


def resolve_model(settings: Siglip2Settings) -> str:
    """The model's local folder on this node; a hub id is downloaded here once if this node lacks it."""
    from common.loading import resolve_model_source
    from siglip2_embed import DOWNLOAD_HELP

    return resolve_model_source(settings.model, download_help=DOWNLOAD_HELP, download=True)


def read_image_spec(settings: Siglip2Settings) -> ImageSpec:
    """The image spec the decoders need, read from the checkpoint's preprocessor config without loading weights.
    The config is read as plain JSON: importing transformers for two numbers costs seconds of every run's start.
    Mirrors ``Siglip2Encoder.image_spec`` (which reads it through transformers); every actor checks that the two
    agree before it embeds anything. A config that leaves them to the processor's defaults is read by transformers.
    """
    from PIL import Image

    from common.loading import WrongModel
    from siglip2_embed import HUB_ID

    folder = resolve_model(settings)
    preprocessor = Path(folder) / "preprocessor_config.json"
    if not preprocessor.is_file():  # not a model of this kind: a message, as the encoder's own check gives
        raise WrongModel(
            f"{folder} has no preprocessor_config.json. The import needs a fixed-resolution SigLIP/SigLIP2 checkpoint "
            f"(model_type 'siglip', e.g. {HUB_ID})."
        )
    config = json.loads(preprocessor.read_text(encoding="utf-8"))
    size, resample = config.get("size") or {}, config.get("resample")
    if not ("height" in size and "width" in size and isinstance(resample, int)):
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(folder)
        size, resample = processor.size, int(processor.resample)
    return ImageSpec(
        size["height"],
        size["width"],
        Image.Resampling(resample),
        settings.max_image_pixels,
        settings.jpeg_draft,
        settings.max_decoded_pixels,
    )


def decode_batch(batch: dict[str, np.ndarray], spec: ImageSpec, max_bytes: int) -> dict[str, np.ndarray]:
    """File bytes (as Ray's reader gives them) -> uint8 pixels at the input size, and an error message ("" when
    fine) per row."""
    return _decode(batch["path"], list(batch["bytes"]), spec, max_bytes)


def read_and_decode_batch(batch: dict[str, np.ndarray], spec: ImageSpec, max_bytes: int) -> dict[str, np.ndarray]:
    """Local files (paths as bytes) -> pixels and errors, read by the standalone indexer's reader: regular files
    only, the size checked on the open file before anything is read, and a file that cannot be read (deleted, a
    FIFO put in its place, no permission) is its row's error, never the task's."""
    datas = [read_or_reason(Path(os.fsdecode(bytes(path))), max_bytes) for path in batch["path"]]
    return _decode(batch["path"], datas, spec, max_bytes)


def _decode(paths: np.ndarray, datas: Sequence[bytes | str], spec: ImageSpec, max_bytes: int) -> dict[str, np.ndarray]:
    """A file that was not read (its entry is why) or does not decode is one row's error, never the task's: the job
    goes on and the driver lists it as a failure."""
    count = len(paths)
    pixels = np.zeros((count, spec.height, spec.width, 3), np.uint8)
    errors = np.full(count, "", dtype=object)
    for row, data in enumerate(datas):
        if isinstance(data, str):
            errors[row] = data
            continue
        try:
            pixels[row] = prepare_image(encoded_bytes(bytes(data), max_bytes), spec)
        except EmbedError as exc:  # the same code and message the service answers with
            errors[row] = f"{exc.code}: {exc.message}"
        except Exception as exc:  # noqa: BLE001 - a decoder bug on one file must not stop a million-file job
            errors[row] = f"internal_error: {type(exc).__name__}: {exc}"
    return {"path": paths, "pixels": pixels, "error": errors}


class ImageEmbedder:
    """One actor of the pool: loads the encoder once, then embeds batches of decoded pixels."""

    def __init__(self, settings: Siglip2Settings, spec: ImageSpec) -> None:
        from cluster.devices import place_on_ray_resources
        from common.loading import explain_broken_weights, pick_device
        from common.precision import pick_dtype
        from siglip2_embed import DOWNLOAD_HELP, Siglip2Encoder

        settings = place_on_ray_resources(settings)  # no GPU of Ray's: the CPU, whatever torch can see
        device = pick_device(settings)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU: "auto" finds it
        # each actor's own CPU decides, as a service's does
        dtype = pick_dtype(settings.dtype, device, cpu_float32_because=settings.cpu_float32_because)
        logger.info("embedding on %s as %s (%s)", device, dtype.name, dtype.reason)
        try:
            folder = resolve_model(settings)
            with explain_broken_weights(folder, DOWNLOAD_HELP):  # as the service loads it: which file, and why
                self.encoder = Siglip2Encoder(folder, device, dtype.dtype, settings.compile)
        except PERMANENT_LOAD_ERRORS as exc:
            # Ray Data gives the driver only this error's text: marked, it says "the model", not "run it again".
            raise PermanentFailure.of(str(exc)) from None
        mine = self.encoder.image_spec(spec.max_pixels, spec.jpeg_draft, spec.max_decoded_pixels)
        if mine != spec:
            raise RuntimeError(f"the decoders use {spec} but the encoder wants {mine}: read_image_spec is out of date")
        self.encoder.warm_up()  # a compiled model compiles now, not on the first batches

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from common.service import l2_normalize

        ok = batch["error"] == ""
        vectors = np.zeros((len(ok), self.encoder.dimension), np.float32)
        errors = batch["error"].copy()
        if ok.any():
            pixels = batch["pixels"] if ok.all() else batch["pixels"][ok]  # no copy in the usual case
            embedded, embed_errors = self.embed(list(pixels))
            vectors[ok] = l2_normalize(embedded)
            errors[ok] = embed_errors
        # The pixels stay behind: only paths, vectors and errors travel back to the driver.
        return {"path": batch["path"], "vector": vectors, "error": errors}

    def embed(self, pixels: list[np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """Raw vectors and an error per image ("" when fine) under the services' failure policy
        (``common.failures``): a batch that runs out of device memory is split in halves, an image that does not fit
        even alone is that row's error, and so is a vector with NaN or infinity (never a row of the index)."""
        from common.failures import run_in_halves

        outputs, errors = run_in_halves(self.encoder.embed_images, pixels, self.encoder.device)
        zero = np.zeros(self.encoder.dimension, np.float32)
        vectors = np.stack([zero if output is None else output for output in outputs])
        return vectors, ["" if error is None else f"{error.code}: {error.message}" for error in errors]


def dataset_location(source: Source, file: SourceFile) -> str | bytes:
    """How a file is named in the dataset's ``path`` column: a local path as its bytes (any name travels through
    Arrow and back exactly), an object's location as it is."""
    return os.fsencode(file.location) if source.is_local_folder else file.location


def embedding_dataset(
    source: Source,
    files: list[SourceFile],
    settings: Siglip2Settings,
    spec: ImageSpec,
    pool: PoolOptions,
) -> ray.data.Dataset:
    """read -> decode (CPU tasks, fused with the read: the bytes never enter the object store) -> embed (actors).
    Rows come out as {"path": ``dataset_location``, "vector": unit vector, "error": "" or why the file failed}."""
    # The same resources for reading and decoding, so Ray Data fuses them into one task: the file bytes never enter
    # the object store. A memory figure that the actors do not share keeps Ray Data from also fusing the decoding
    # into the encoder actors (it does that on a CPU-only cluster when both ask for one CPU), which would decode in
    # the actors, one image at a time, instead of on every core.
    decode_resources: dict[str, Any] = {"num_cpus": 1, "memory": decode_memory(spec, files, pool.batch_size)}
    blocks = max(1, math.ceil(len(files) / pool.batch_size))  # batch_size files per task: bounds its memory
    if source.is_local_folder:
        # Local files are read in the decoding task by the standalone indexer's reader (see read_and_decode_batch):
        # Ray's reader takes paths as text (a name that is not UTF-8 fails the listing) and reads a file whole,
        # whatever it is, before anything can check it.
        paths = ray.data.from_items([{"path": dataset_location(source, f)} for f in files], override_num_blocks=blocks)
        read_decode = partial(read_and_decode_batch, spec=spec, max_bytes=settings.max_image_bytes)
        dataset = paths.map_batches(read_decode, batch_size=None, batch_format="numpy", **decode_resources)
    else:
        dataset = ray.data.read_binary_files(
            [f.location for f in files],
            include_paths=True,
            filesystem=source.filesystem,
            # batch_size objects per read task: the decoding gets whole blocks (see below).
            override_num_blocks=blocks,
            **decode_resources,
            # An object deleted since the listing is skipped, not a failed job; the driver reports it.
            ignore_missing_paths=True,
            # No file_extensions: the listing already kept only image extensions, case-insensitively, as the
            # standalone indexer does.
        )
        dataset = dataset.map_batches(
            partial(decode_batch, spec=spec, max_bytes=settings.max_image_bytes),
            # Whole read blocks: Ray Data fuses a read only into a map without a batch size.
            batch_size=None,
            batch_format="numpy",
            **decode_resources,
        )
    constructor_kwargs: dict[str, Any] = {"settings": settings, "spec": spec}
    return dataset.map_batches(
        ImageEmbedder,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=pool.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_gpus=pool.gpus_per_actor,
        num_cpus=pool.cpus_per_actor,
    )
