"""The paths that differ on a GPU, proved on the CPU: a reduced-precision model keeps its float32 scalars, copies to
the device never read memory that may be freed under them, torch.compile does all its compiling at start-up, and
a dtype that overflows is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from safetensors import safe_open

from qwen3_embed import Qwen3Settings
from qwen3_embed import main as qwen3_main
from siglip2_embed import Siglip2Settings
from siglip2_embed import build_app as build_image_app
from tests.helpers import image_bytes, photo_like, ready_client


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
