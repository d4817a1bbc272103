"""The paths that differ on a GPU, proved on the CPU: a reduced-precision model keeps its float32 scalars, copies to
the device never read memory that may be freed under them, torch.compile does all its compiling at start-up, and
a dtype that overflows is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError
from safetensors import safe_open
from torch._dynamo.utils import counters
from torch.overrides import TorchFunctionMode

from qwen3_embed import Qwen3Encoder, Qwen3Settings
from qwen3_embed import main as qwen3_main
from siglip2_embed import Siglip2Encoder, Siglip2Settings
from siglip2_embed import build_app as build_image_app
from tests.helpers import CPU, image_bytes, photo_like, ready_client


@pytest.fixture(scope="module")
def bfloat16_image_client(tiny_siglip: Path) -> Iterator[TestClient]:
    yield from ready_client(build_image_app(Siglip2Settings(model=str(tiny_siglip), device="cpu", dtype="bfloat16")))


def test_pair_probabilities_of_a_bfloat16_model_use_the_checkpoints_float32_scalars(
    bfloat16_image_client: TestClient, tiny_siglip: Path
) -> None:
    """The model runs in bfloat16 (as on CUDA), but sigmoid(cosine * exp(logit_scale) + logit_bias) uses the
    scalars as the checkpoint stores them: rounded to bfloat16 they move every probability."""
    with safe_open(str(tiny_siglip / "model.safetensors"), framework="np") as checkpoint:
        scale = float(checkpoint.get_tensor("logit_scale").astype(np.float32).item())
        bias = float(checkpoint.get_tensor("logit_bias").astype(np.float32).item())
    client = bfloat16_image_client
    assert client.get("/info").json()["dtype"] == "bfloat16"
    files = [("files", ("x.png", image_bytes(photo_like(64, 64, seed=seed)))) for seed in range(3)]
    body = client.post("/similarity", files=files, data={"texts": '["a photo of a cat", "the sea", "red"]'}).json()
    cosine = np.asarray(body["cosine"], dtype=np.float64)
    expected = 1 / (1 + np.exp(-(cosine * np.exp(scale) + bias)))
    np.testing.assert_allclose(body["similarities"], expected, atol=1e-5, rtol=0)
    info = client.get("/info").json()
    assert (info["logit_scale"], info["logit_bias"]) == (scale, bias)


def test_float16_is_refused_for_qwen3_with_a_message(tiny_zimage: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """float16 overflows in Qwen3's activations (NaN vectors): the service does not start with it."""
    with pytest.raises(ValidationError, match="float16 overflows"):
        Qwen3Settings(model=str(tiny_zimage), dtype="float16")
    with pytest.raises(SystemExit) as exited:
        qwen3_main(["--model", str(tiny_zimage), "--dtype", "float16"])
    assert exited.value.code == 2
    assert "float16 overflows" in capsys.readouterr().err
    assert Qwen3Settings(model=str(tiny_zimage), dtype="bfloat16").dtype == "bfloat16"


class AsyncCopiesFromPageableMemory(TorchFunctionMode):
    """Records every ``Tensor.to(..., non_blocking=True)`` whose source is CPU memory that is not pinned: on CUDA
    such a copy is synchronous anyway, and on MPS it can read the memory after it has been freed."""

    def __init__(self) -> None:
        super().__init__()
        self.unsafe: list[tuple[int, ...]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        source: Any = args[0] if args else None
        asynchronous = func is torch.Tensor.to and bool(kwargs.get("non_blocking"))
        if asynchronous and source.device.type == "cpu" and not source.is_pinned():
            self.unsafe.append(tuple(source.shape))
        return func(*args, **kwargs)


def test_no_asynchronous_copy_reads_pageable_memory(tiny_siglip: Path, tiny_zimage: Path) -> None:
    image_encoder = Siglip2Encoder(str(tiny_siglip), CPU, torch.float32)
    text_encoder = Qwen3Encoder(str(tiny_zimage), CPU, torch.float32)
    pixels = [np.full((image_encoder.input_height, image_encoder.input_width, 3), value, np.uint8) for value in (0, 9)]
    with AsyncCopiesFromPageableMemory() as copies:
        image_encoder.embed_images(pixels)
        image_encoder.embed_texts(["a cat", "the sea"])
        text_encoder.embed_texts(["a cat", "the sea"])
    assert copies.unsafe == []


def test_torch_compile_compiles_only_at_start_up(tiny_siglip: Path, tiny_zimage: Path) -> None:
    """With --compile, warm_up makes every graph the services need: batches of 1 to max_batch_size afterwards (texts
    of equal and of different lengths) compile nothing more, so no live request waits for a compile. The eager
    backend traces and counts graphs as inductor would, without generating kernels."""
    image_encoder = Siglip2Encoder(str(tiny_siglip), CPU, torch.float32, True, compile_backend="eager")
    text_encoder = Qwen3Encoder(str(tiny_zimage), CPU, torch.float32, compile_model=True, compile_backend="eager")
    counters.clear()
    image_encoder.warm_up()
    text_encoder.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 3  # the models are compiled: each tower and the text model made graphs
    blank = np.zeros((image_encoder.input_height, image_encoder.input_width, 3), np.uint8)
    for count in range(1, Qwen3Settings.model_fields["max_batch_size"].default + 1):
        image_encoder.embed_images([blank] * count)
        image_encoder.embed_texts(["a photo of a cat"] * count)
        text_encoder.embed_texts(["the sea"] * count)
        text_encoder.embed_texts(["a red tree " * (i + 1) for i in range(count)])
    assert counters["stats"]["unique_graphs"] == graphs


def test_no_request_after_a_wake_that_reloads_a_compiled_model_compiles(tiny_zimage: Path) -> None:
    """``unload`` builds the model anew on a wake: with --compile, no request after it waits for a compile (torch
    2.13 reuses the graphs it compiled for the model's class; the wake's own warm-up would compile them if not)."""
    encoder = Qwen3Encoder(str(tiny_zimage), CPU, torch.float32, compile_model=True, compile_backend="eager")
    encoder.warm_up()
    encoder.release_weights("unload")
    encoder.restore_weights("unload")
    graphs = counters["stats"]["unique_graphs"]
    for count in range(1, 5):
        encoder.embed_texts(["a red tree " * (i + 1) for i in range(count)])
    assert counters["stats"]["unique_graphs"] == graphs
