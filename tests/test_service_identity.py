"""Nothing stores wrong vectors silently, on the service side: each service says what it is (modalities, model,
version, tiny weights) in /health and /info; the OpenAI route refuses what it cannot honour (``dimensions``,
token ids) instead of ignoring it; --help names every environment variable with its real default; clients of the
Quadux SigLIP API get the keys and request forms they use; a wrong model folder is one clear message."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from qwen3_embed import Qwen3Settings
from qwen3_embed import build_app as build_text_app
from siglip2_embed import Siglip2Settings
from siglip2_embed import build_app as build_image_app
from tests.helpers import assert_error, image_bytes, photo_like, ready_client

ROOT = Path(__file__).resolve().parents[1]
JPEG = image_bytes(photo_like(64, 48, seed=3), "JPEG")
PNG = image_bytes(photo_like(40, 30, seed=4), "PNG")


@pytest.fixture(params=["image", "text"])
def any_client(request: pytest.FixtureRequest, image_client: TestClient, text_client: TestClient) -> TestClient:
    return image_client if request.param == "image" else text_client


# -- each service says what it is --------------------------------------------------------------------------------


def test_health_and_info_state_modalities_and_tiny_weights(image_client: TestClient, text_client: TestClient) -> None:
    for client, modalities in ((image_client, ["image", "text"]), (text_client, ["text"])):
        health = client.get("/health").json()
        info = client.get("/info").json()
        assert health["modalities"] == info["modalities"] == modalities
        assert health["tiny"] is True and info["tiny"] is True  # the tiny test models carry the marker
        assert health["version"] == info["version"] and health["dimension"] == info["dimension"]
        # Clients of the Quadux SigLIP API read the vector length from /health under this name.
        assert health["dimensions"] == health["dimension"]


def test_real_weights_are_not_reported_as_tiny(tiny_siglip: Path, tmp_path: Path) -> None:
    copy = tmp_path / "siglip-copy"
    copy.mkdir()
    for path in tiny_siglip.iterdir():
        if path.name != "RANDOM_WEIGHTS.txt":
            (copy / path.name).write_bytes(path.read_bytes())
    for client in ready_client(build_image_app(Siglip2Settings(model=str(copy)))):
        assert client.get("/health").json()["tiny"] is False


def test_tiny_weights_are_announced_in_the_log(tiny_zimage: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        for _ in ready_client(build_text_app(Qwen3Settings(model=str(tiny_zimage)))):
            pass
    assert any("TINY RANDOM WEIGHTS" in record.getMessage() for record in caplog.records)


def test_text_service_has_no_image_routes(text_client: TestClient) -> None:
    assert text_client.post("/embed/image", files={"file": ("a.jpg", JPEG)}).status_code == 404
    paths = text_client.get("/openapi.json").json()["paths"]
    assert "/embed/images" not in paths and "/embed/texts" in paths


def test_info_is_typed_in_the_openapi_schema(image_client: TestClient) -> None:
    schema = image_client.get("/openapi.json").json()
    info = schema["components"]["schemas"]["ServiceInfo"]["properties"]
    assert {"modalities", "tiny", "dimension", "version", "limits"} <= set(info)
    responses = schema["paths"]["/embed/texts"]["post"]["responses"]
    assert {"400", "413", "422", "429", "503"} <= set(responses)  # error responses are declared


def test_health_is_typed_in_the_openapi_schema(any_client: TestClient) -> None:
    schema = any_client.get("/openapi.json").json()
    responses = schema["paths"]["/health"]["get"]["responses"]
    assert responses["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Health"}
    assert "503" in responses
    health = schema["components"]["schemas"]["Health"]["properties"]
    assert {
        "status",
        "model",
        "version",
        "dimension",
        "dimensions",
        "device",
        "modalities",
        "tiny",
        "fingerprint",
        "state",
        "instance",
    } == set(health)


# -- OpenAI route: what it cannot honour is refused ---------------------------------------------------------------


def test_dimensions_equal_to_the_native_dimension_is_accepted(any_client: TestClient) -> None:
    dimension = any_client.get("/info").json()["dimension"]
    body = any_client.post("/v1/embeddings", json={"input": "a cat", "dimensions": dimension}).json()
    assert len(body["data"][0]["embedding"]) == dimension


@pytest.mark.parametrize("dimensions", [8, 1, 0, -1, 100000])
def test_other_dimensions_are_400(any_client: TestClient, dimensions: int) -> None:
    error = assert_error(
        any_client.post("/v1/embeddings", json={"input": "a cat", "dimensions": dimensions}), 400, "invalid_input"
    )
    assert "truncat" in error["message"] and str(dimensions) in error["message"]


@pytest.mark.parametrize("tokens", [[1, 2, 3], [[1, 2], [3]]], ids=["ids", "batches-of-ids"])
def test_token_ids_are_400_send_strings(any_client: TestClient, tokens: list[Any]) -> None:
    error = assert_error(any_client.post("/v1/embeddings", json={"input": tokens}), 400, "invalid_input")
    assert "send strings" in error["message"] and len(error["message"]) < 200


@pytest.mark.parametrize("body", [{"input": []}, {"input": [""]}, {"input": ["a", 1]}])
def test_empty_and_mixed_inputs_stay_422(any_client: TestClient, body: dict[str, Any]) -> None:
    assert_error(any_client.post("/v1/embeddings", json=body), 422, "invalid_request")


# -- --help ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("program", "expected"),
    [
        (
            "siglip2_embed.py",
            ["--model", "SIGLIP2_MODEL", "EMBED_API_KEY", "default: 6010", "FORCE_CPU", "--max-image-pixels"],
        ),
        ("qwen3_embed.py", ["--model", "QWEN3_MODEL", "QWEN3_LAYER", "EMBED_API_KEY", "default: -2", "default: 6011"]),
    ],
)
def test_help_names_every_variable_and_real_defaults(program: str, expected: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, program, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    for text in expected:
        assert text in result.stdout, text
    for placeholder in ("default factory", "<lambda>", "SecretStr", "{str,null}"):
        assert placeholder not in result.stdout
    # Every flag line is followed by its environment variables and default.
    flags = [line for line in result.stdout.splitlines() if line.startswith("  --")]
    assert len(flags) == result.stdout.count("      env: ") >= 20


# -- clients of the Quadux SigLIP API -----------------------------------------------------------------------------


def test_responses_carry_dimensions_beside_dimension(any_client: TestClient) -> None:
    one = any_client.post("/embed/text", json={"text": "a cat"}).json()
    many = any_client.post("/embed/texts", json={"texts": ["a cat", "a dog"]}).json()
    for body in (one, many):
        assert body["dimensions"] == body["dimension"] == any_client.get("/info").json()["dimension"]


def test_embed_image_takes_a_form_field_image_base64(image_client: TestClient) -> None:
    by_file = image_client.post("/embed/image", files={"file": ("a.jpg", JPEG)}).json()
    by_field = image_client.post("/embed/image", data={"image_base64": base64.b64encode(JPEG).decode()}).json()
    np.testing.assert_allclose(by_field["embedding"], by_file["embedding"], atol=1e-6)
    assert by_field["dimensions"] == by_file["dimension"]


def test_embed_image_needs_exactly_one_image(image_client: TestClient) -> None:
    assert_error(image_client.post("/embed/image", data={"normalize": "true"}), 422, "invalid_request")
    both = image_client.post(
        "/embed/image", files={"file": ("a.jpg", JPEG)}, data={"image_base64": base64.b64encode(JPEG).decode()}
    )
    assert_error(both, 422, "invalid_request")
    assert_error(image_client.post("/embed/image", data={"image_base64": "%%%"}), 400, "invalid_image")


def test_similarity_returns_embeddings_when_asked(image_client: TestClient) -> None:
    files = [("files", ("a.jpg", JPEG)), ("files", ("b.png", PNG))]
    texts = json.dumps(["a cat", "a dog", "a car"])
    small = image_client.post("/similarity", files=files, data={"texts": texts}).json()
    assert "text_embeddings" not in small and "image_embeddings" not in small  # small by default
    full = image_client.post("/similarity", files=files, data={"texts": texts, "return_embeddings": "true"}).json()
    text_vectors, image_vectors = np.asarray(full["text_embeddings"]), np.asarray(full["image_embeddings"])
    assert text_vectors.shape == (3, full["dimensions"]) and image_vectors.shape == (2, full["dimensions"])
    np.testing.assert_allclose(text_vectors @ image_vectors.T, full["cosine"], atol=1e-5)
    alone = image_client.post("/embed/images", files=files).json()["embeddings"]
    np.testing.assert_allclose(image_vectors, alone, atol=1e-5)


def test_info_carries_the_quadux_keys(image_client: TestClient, text_client: TestClient) -> None:
    info = image_client.get("/info").json()
    assert info["text_dim"] == info["vision_dim"] == info["dimension"]
    assert info["image_size"] == info["image"]["input_size"][0] and info["cross_modal"] is True


# -- clear messages ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/embed/text", "/embed/texts", "/v1/embeddings", "/embed/image/base64"])
def test_json_sent_without_content_type_says_so(image_client: TestClient, route: str) -> None:
    response = image_client.post(route, content=b'{"text": "a cat"}', headers={"content-type": "text/plain"})
    error = assert_error(response, 422, "invalid_request")
    assert "Content-Type: application/json" in error["message"] and "valid dictionary" not in error["message"]


def test_siglip_given_a_zimage_folder_says_what_it_is(tiny_zimage: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR), TestClient(build_image_app(Siglip2Settings(model=str(tiny_zimage)))) as c:
        for _ in range(500):
            if c.get("/health").json()["status"] != "loading":
                break
        assert c.get("/health").json() == {"status": "unhealthy"}
    failures = [record for record in caplog.records if "loading the model failed" in record.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is None  # one clear line, no traceback
    message = failures[0].getMessage()
    assert "diffusers pipeline" in message and "SigLIP" in message


def test_hub_warnings_are_logged_once(tmp_path: Path) -> None:
    # In a child process: configure_logging replaces the root handlers.
    program = (
        "import logging, common.server as server\n"
        "server.configure_logging('info')\n"
        "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stderr.count("Retrying in 1s") == 1, result.stderr
