"""The official ``openai`` client against both services: float and base64, string and list, image data URIs."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from qwen3_embed import Qwen3Settings
from qwen3_embed import build_app as build_text_app
from siglip2_embed import Siglip2Settings
from siglip2_embed import build_app as build_image_app
from tests.helpers import image_bytes, photo_like, ready_client

PNG = image_bytes(photo_like(40, 30, seed=11))
DATA_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()


@pytest.fixture(scope="module")
def image_http(tiny_siglip: Path) -> Iterator[TestClient]:
    yield from ready_client(build_image_app(Siglip2Settings(model=str(tiny_siglip), api_key="k")))


@pytest.fixture(scope="module")
def text_http(tiny_zimage: Path) -> Iterator[TestClient]:
    yield from ready_client(build_text_app(Qwen3Settings(model=str(tiny_zimage))))


def sdk(http: TestClient, api_key: str = "k") -> openai.OpenAI:
    # TestClient is an httpx.Client, so the real SDK talks to the app in-process.
    return openai.OpenAI(base_url="http://testserver/v1", api_key=api_key, http_client=http, max_retries=0)


def as_vector(embedding: object) -> np.ndarray:
    """An explicit encoding_format="base64" leaves the SDK's result undecoded; its default decodes it."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding)


def native_texts(http: TestClient, texts: list[str]) -> np.ndarray:
    response = http.post("/embed/texts", json={"texts": texts}, headers={"Authorization": "Bearer k"})
    return np.asarray(response.json()["embeddings"])


def test_text_service_with_the_openai_client(text_http: TestClient) -> None:
    client = sdk(text_http)
    texts = ["一只猫在晒太阳", "a dog", "x"]
    expected = native_texts(text_http, texts)
    for encoding in ("float", "base64"):
        result = client.embeddings.create(model="Qwen3-4B", input=texts, encoding_format=encoding)
        got = np.asarray([as_vector(item.embedding) for item in result.data])
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert [item.index for item in result.data] == [0, 1, 2]
        assert result.model == "Qwen3-4B" and result.usage.prompt_tokens == result.usage.total_tokens > 3 * 10
    # the SDK's default (base64 under the hood) and a single string
    single = client.embeddings.create(model="m", input="a dog")
    np.testing.assert_allclose(single.data[0].embedding, expected[1], atol=1e-6)


def test_image_service_mixes_images_and_texts(image_http: TestClient) -> None:
    client = sdk(image_http)
    result = client.embeddings.create(model="siglip", input=["a photo of a cat", DATA_URI], encoding_format="float")
    image = image_http.post(
        "/embed/image", files={"file": ("a.png", PNG)}, headers={"Authorization": "Bearer k"}
    ).json()["embedding"]
    np.testing.assert_allclose(result.data[0].embedding, native_texts(image_http, ["a photo of a cat"])[0], atol=1e-6)
    np.testing.assert_allclose(result.data[1].embedding, image, atol=1e-6)
    b64 = client.embeddings.create(model="siglip", input=[DATA_URI], encoding_format="base64")
    np.testing.assert_allclose(as_vector(b64.data[0].embedding), image, atol=1e-6)


def test_raw_base64_is_little_endian_float32(text_http: TestClient) -> None:
    body = text_http.post("/v1/embeddings", json={"input": "a dog", "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, native_texts(text_http, ["a dog"])[0], atol=1e-7)
    assert (
        body["object"] == "list"
        and body["data"][0]["object"] == "embedding"
        and body["model"] == "Z-Image-tiny-text-encoder"
    )


def test_errors_reach_the_client_as_openai_errors(image_http: TestClient, text_http: TestClient) -> None:
    with pytest.raises(openai.AuthenticationError):
        sdk(image_http, api_key="wrong").embeddings.create(model="m", input="a")
    with pytest.raises(openai.BadRequestError) as bad_image:
        sdk(image_http).embeddings.create(model="m", input=["data:image/png;base64,AAAA"])
    assert "image" in str(bad_image.value)
    with pytest.raises(openai.UnprocessableEntityError):
        sdk(text_http).embeddings.create(model="m", input=[""])
    with pytest.raises(openai.BadRequestError, match="send strings"):
        sdk(text_http).embeddings.create(model="m", input=[1, 2])
    bad_bodies: list[dict[str, object]] = [
        {"input": []},
        {"input": [1, "a"]},
        {"input": "a", "encoding_format": "hex"},
        {},
    ]
    for body in bad_bodies:
        response = text_http.post("/v1/embeddings", json=body)
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
