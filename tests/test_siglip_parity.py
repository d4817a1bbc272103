"""The image service's vectors equal a reference computed directly with transformers on the same tiny model."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, SiglipModel

from siglip2_embed import Siglip2Settings, build_app
from tests.helpers import image_bytes, photo_like, ready_client

MIN_COSINE = 0.9999


class Reference:
    """SigLIP as its model card uses it: the checkpoint's processor, lowercase text padded right to 64 tokens."""

    def __init__(self, path: Path) -> None:
        self.model = SiglipModel.from_pretrained(path).eval()
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> np.ndarray:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return normalize(self.model.get_image_features(pixel_values=pixels).pooler_output.numpy())

    def input_ids(self, texts: list[str]) -> torch.Tensor:
        lowered = [text.lower() for text in texts]
        return self.tokenizer(lowered, padding="max_length", max_length=64, truncation=True, return_tensors="pt")[
            "input_ids"
        ]

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        return normalize(self.model.get_text_features(input_ids=self.input_ids(texts)).pooler_output.numpy())

    @torch.no_grad()
    def probabilities(self, texts: list[str], images: list[Image.Image]) -> np.ndarray:
        """SiglipModel's own forward: logits_per_text -> sigmoid."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        output = self.model(input_ids=self.input_ids(texts), pixel_values=pixels)
        return torch.sigmoid(output.logits_per_text).numpy()


def normalize(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def assert_rows_match(actual: object, expected: np.ndarray) -> None:
    got = np.asarray(actual, dtype=np.float64).reshape(expected.shape)
    cosines = np.sum(normalize(got) * normalize(expected), axis=-1)
    assert np.all(cosines >= MIN_COSINE), cosines
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def reference(tiny_siglip: Path) -> Reference:
    return Reference(tiny_siglip)


@pytest.fixture(scope="module")
def client(tiny_siglip: Path) -> Iterator[TestClient]:
    yield from ready_client(build_app(Siglip2Settings(model=str(tiny_siglip))))


# Different sizes, aspect ratios and modes; PNG and small JPEGs decode identically in both paths.
IMAGES = {
    "rgb_wide.png": photo_like(160, 90, seed=1),
    "grey_tall.png": photo_like(50, 200, seed=2, mode="L"),
    "palette.png": photo_like(300, 240, seed=3).convert("P"),
    "small.jpg": photo_like(120, 100, seed=4),
    "tiny.png": photo_like(3, 5, seed=5),
}


def encoded(name: str) -> bytes:
    image = IMAGES[name]
    return image_bytes(image, "JPEG", quality=90) if name.endswith(".jpg") else image_bytes(image)


def as_rgb(name: str) -> Image.Image:
    from io import BytesIO

    return Image.open(BytesIO(encoded(name))).convert("RGB")


def test_single_image_routes_match_reference(client: TestClient, reference: Reference) -> None:
    for name in IMAGES:
        expected = reference.images([as_rgb(name)])
        multipart = client.post("/embed/image", files={"file": (name, encoded(name))})
        assert multipart.status_code == 200, multipart.text
        assert_rows_match(multipart.json()["embedding"], expected)
        b64 = base64.b64encode(encoded(name)).decode()
        for payload in (b64, f"data:image/png;base64,{b64}"):
            response = client.post("/embed/image/base64", json={"image_base64": payload})
            assert response.status_code == 200, response.text
            assert_rows_match(response.json()["embedding"], expected)


def test_batched_image_routes_match_reference_in_order(client: TestClient, reference: Reference) -> None:
    names = list(IMAGES)
    expected = np.concatenate([reference.images([as_rgb(name)]) for name in names])
    multipart = client.post("/embed/images", files=[("files", (name, encoded(name))) for name in names])
    assert multipart.status_code == 200, multipart.text
    assert_rows_match(multipart.json()["embeddings"], expected)
    as_json = client.post(
        "/embed/images", json={"images_base64": [base64.b64encode(encoded(name)).decode() for name in names]}
    )
    assert as_json.status_code == 200, as_json.text
    assert_rows_match(as_json.json()["embeddings"], expected)


def test_unnormalized_image_vector_is_the_raw_pooler_output(client: TestClient, reference: Reference) -> None:
    with torch.no_grad():
        pixels = reference.processor(images=[as_rgb("rgb_wide.png")], return_tensors="pt")["pixel_values"]
        raw = reference.model.get_image_features(pixel_values=pixels).pooler_output.numpy()[0]
    response = client.post(
        "/embed/image", files={"file": ("a.png", encoded("rgb_wide.png"))}, data={"normalize": "false"}
    )
    np.testing.assert_allclose(response.json()["embedding"], raw, rtol=1e-4, atol=1e-5)


TEXTS = ["a photo of a cat", "A Photo Of A DOG on the sea", "x", "the " * 100 + "end", "ünïcødé 猫 🐈"]


def test_text_routes_match_reference(client: TestClient, reference: Reference) -> None:
    expected = reference.texts(TEXTS)
    single = [client.post("/embed/text", json={"text": text}).json()["embedding"] for text in TEXTS]
    assert_rows_match(single, expected)
    for route in ("/embed/text", "/embed/texts"):
        response = client.post(route, json={"texts": TEXTS})
        assert response.status_code == 200, response.text
        assert_rows_match(response.json()["embeddings"], expected)


def test_text_recipe_details_matter(client: TestClient, reference: Reference) -> None:
    """Uppercase equals lowercase (we lowercase), and left padding would give a different vector."""
    upper = client.post("/embed/text", json={"text": "A PHOTO OF A CAT"}).json()["embedding"]
    lower = client.post("/embed/text", json={"text": "a photo of a cat"}).json()["embedding"]
    np.testing.assert_allclose(upper, lower, atol=1e-6)
    reference.tokenizer.padding_side = "left"
    try:
        left_padded = reference.texts(["a photo of a cat"])[0]
    finally:
        reference.tokenizer.padding_side = "right"
    assert float(np.dot(left_padded, np.asarray(lower))) < MIN_COSINE


def test_similarity_and_rank_equal_siglip_logits(client: TestClient, reference: Reference) -> None:
    names = ["rgb_wide.png", "small.jpg", "palette.png"]
    texts = ["a photo of a cat", "a red sun"]
    files = [("files", (name, encoded(name))) for name in names]
    response = client.post("/similarity", files=files, data={"texts": json.dumps(texts)})
    assert response.status_code == 200, response.text
    body = response.json()
    images = [as_rgb(name) for name in names]
    expected_probs = reference.probabilities(texts, images)
    expected_cos = reference.texts(texts) @ reference.images(images).T
    np.testing.assert_allclose(body["similarities"], expected_probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(body["cosine"], expected_cos, atol=1e-5)

    ranked = client.post("/rank", files=files, data={"query": texts[1]}).json()["rankings"]
    order = np.argsort(-expected_cos[1])
    assert [r["index"] for r in ranked] == order.tolist()
    assert [r["rank"] for r in ranked] == [1, 2, 3]
    assert [r["filename"] for r in ranked] == [names[i] for i in order]
    np.testing.assert_allclose([r["score"] for r in ranked], expected_probs[1][order], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([r["cosine"] for r in ranked], expected_cos[1][order], atol=1e-5)


def test_concurrent_requests_match_one_by_one(client: TestClient, reference: Reference) -> None:
    """Requests batched together by the micro-batcher each get exactly their own vector."""
    from concurrent.futures import ThreadPoolExecutor

    names = list(IMAGES) * 4
    expected = {name: reference.images([as_rgb(name)])[0] for name in IMAGES}
    with ThreadPoolExecutor(16) as pool:
        responses = list(
            pool.map(lambda name: client.post("/embed/image", files={"file": (name, encoded(name))}), names)
        )
    for name, response in zip(names, responses, strict=True):
        assert_rows_match(response.json()["embedding"], expected[name][None])


def test_large_jpeg_with_draft_decoding_stays_close(client: TestClient, reference: Reference) -> None:
    """Draft (DCT-scaled) decoding of a big JPEG changes the vector only marginally."""
    data = image_bytes(photo_like(1600, 1200, seed=9), "JPEG", quality=92)
    from io import BytesIO

    expected = reference.images([Image.open(BytesIO(data)).convert("RGB")])
    got = np.asarray(client.post("/embed/image", files={"file": ("big.jpg", data)}).json()["embedding"])
    assert float(got @ expected[0]) >= 0.999
