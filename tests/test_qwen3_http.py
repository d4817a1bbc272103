"""HTTP behaviour of the text service on the tiny models: shapes, /info, versions, errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from common.config import load_settings
from common.identity import weights_fingerprint
from qwen3_embed import Qwen3Settings, build_app, main
from tests.helpers import assert_error, ready_client, wait_loaded


@pytest.fixture(scope="module")
def client(tiny_zimage: Path) -> Iterator[TestClient]:
    settings = Qwen3Settings(model=str(tiny_zimage), max_items_per_request=8, max_text_chars=1000)
    yield from ready_client(build_app(settings))


def test_the_request_shapes_existing_clients_use(client: TestClient, tiny_zimage: Path) -> None:
    """The request and response shapes the existing indexers of this service use: ``{"text": ...}`` on /embed/text,
    ``{"texts": [...]}`` on /embed/texts, and the /health body they check before indexing."""
    one = client.post("/embed/text", json={"text": "一只猫在晒太阳"}).json()
    assert set(one) == {"embedding", "dimension", "dimensions", "model", "version"}
    assert one["dimension"] == 32 and len(one["embedding"]) == 32 and one["version"] == "1.0"
    assert one["model"] == "Z-Image-tiny-text-encoder"
    many = client.post("/embed/texts", json={"texts": ["一只猫", "一只狗", "美丽的风景"]}).json()
    assert len(many["embeddings"]) == 3 and many["dimension"] == 32
    assert client.get("/health").json() == {
        "status": "ok",
        "model": "Z-Image-tiny-text-encoder",
        "version": "1.0",
        "dimension": 32,
        "dimensions": 32,
        "device": "cpu",
        "modalities": ["text"],
        "tiny": True,
        "fingerprint": weights_fingerprint([tiny_zimage / "text_encoder", tiny_zimage / "tokenizer"]),
        "state": "awake",
    }


def test_info_reports_the_recipe(client: TestClient) -> None:
    info = client.get("/info").json()
    recipe = info["recipe"]
    assert recipe["template"] == "zimage" and recipe["layer"] == -2 and recipe["pooling"] == "mean"
    assert recipe["max_length"] == 512 and "truncated" in recipe["truncation"]
    assert recipe["layers_run"] == recipe["num_layers"] - 1 == 3
    assert info["layout"].startswith("z-image") and info["limits"]["max_items_per_request"] == 8


def test_unnormalized(client: TestClient) -> None:
    raw = client.post("/embed/texts", json={"texts": ["a cat"], "normalize": False}).json()["embeddings"][0]
    unit = client.post("/embed/texts", json={"texts": ["a cat"]}).json()["embeddings"][0]
    np.testing.assert_allclose(np.asarray(raw) / np.linalg.norm(raw), unit, atol=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"text": ""}, 422, "invalid_request"),
        ({"text": None}, 422, "invalid_request"),
        ({"text": 12}, 422, "invalid_request"),
        ({"text": ["a"]}, 422, "invalid_request"),
        ({"texts": []}, 422, "invalid_request"),
        ({"texts": "a cat"}, 422, "invalid_request"),
        ({"texts": ["ok", ""]}, 422, "invalid_request"),
        ({"texts": ["ok", {"a": 1}]}, 422, "invalid_request"),
        ({"texts": ["a"] * 9}, 413, "too_many_items"),
        ({"text": "a" * 1001}, 413, "payload_too_large"),
        ({"normalize": True}, 422, "invalid_request"),
    ],
)
def test_bad_bodies(client: TestClient, body: dict[str, Any], status: int, code: str) -> None:
    route = "/embed/texts" if "texts" in body else "/embed/text"
    error = assert_error(client.post(route, json=body), status, code)
    if code != "invalid_request":
        assert "--max-" in error["message"]  # says which setting raises the limit
    assert client.get("/health").status_code == 200


def test_invalid_json_is_422(client: TestClient) -> None:
    response = client.post("/embed/text", content=b'{"text": ', headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_request")


def test_version_names_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN3_POOLING", "last")
    settings = load_settings(Qwen3Settings, ["--layer", "-1", "--template", "none", "--model", "/m"])
    assert (settings.layer, settings.pooling, settings.template) == (-1, "last", "none")
    assert settings.recipe().version() == "1.0+layer=-1,pooling=last,template=none"
    monkeypatch.delenv("QWEN3_POOLING")
    assert Qwen3Settings(model="/m").recipe().version() == "1.0"
    assert Qwen3Settings(model="/m", max_length=256).recipe().version() == "1.0+max_length=256"


def test_plain_qwen3_folder_serves_embedding_recipe(tiny_qwen3: Path) -> None:
    settings = Qwen3Settings(model=str(tiny_qwen3), layer=-1, pooling="last", template="none")
    for client in ready_client(build_app(settings)):
        body = client.post("/embed/text", json={"text": "a cat"}).json()
        assert body["model"] == "Qwen3-Embedding-tiny" and body["version"].startswith("1.0+")
        assert client.get("/info").json()["layout"] == "plain"


def test_layer_out_of_range_fails_loading(tiny_qwen3: Path) -> None:
    with TestClient(build_app(Qwen3Settings(model=str(tiny_qwen3), layer=9))) as client:
        assert wait_loaded(client).json() == {"status": "unhealthy"}


def test_missing_model_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tmp_path / "Z-Image-Turbo")]) == 1
    err = capsys.readouterr().err
    assert "hf download Tongyi-MAI/Z-Image-Turbo" in err and "Traceback" not in err
