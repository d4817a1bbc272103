"""A weights file that is truncated (an interrupted download or copy) or corrupt: the service turns unhealthy and
its log names the file and says to download it again, instead of a bare safetensors traceback."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from qwen3_embed import Qwen3Settings
from qwen3_embed import build_app as build_text_app
from siglip2_embed import Siglip2Settings
from siglip2_embed import build_app as build_image_app


def damaged_copy(model: Path, into: Path, weights: str, keep: float | int) -> Path:
    """A copy of a model folder whose weights file keeps only its first ``keep`` bytes (or fraction)."""
    copy = into / model.name
    shutil.copytree(model, copy)
    target = copy / weights
    data = target.read_bytes()
    target.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    return target


def wait_unhealthy(app: FastAPI) -> None:
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            response = client.get("/health")
            if response.json()["status"] != "loading":
                break
            time.sleep(0.02)
        assert response.status_code == 503 and response.json() == {"status": "unhealthy"}, response.text


@pytest.mark.parametrize("keep", [0.5, 100, 0], ids=["half", "inside-the-header", "empty"])
def test_truncated_siglip_weights_name_the_file(
    tiny_siglip: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, keep: float | int
) -> None:
    weights = damaged_copy(tiny_siglip, tmp_path, "model.safetensors", keep)
    with caplog.at_level(logging.ERROR):
        wait_unhealthy(build_image_app(Siglip2Settings(model=str(weights.parent))))
    assert str(weights) in caplog.text
    assert "re-download it" in caplog.text
    assert "hf download google/siglip2-so400m-patch16-512" in caplog.text


def test_truncated_qwen3_weights_name_the_file(
    tiny_zimage: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights = damaged_copy(tiny_zimage, tmp_path, "text_encoder/model.safetensors", 0.7)
    with caplog.at_level(logging.ERROR):
        wait_unhealthy(build_text_app(Qwen3Settings(model=str(tmp_path / tiny_zimage.name))))
    assert str(weights) in caplog.text
    assert "re-download it" in caplog.text
