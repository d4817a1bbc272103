"""HTTP behaviour of the image service on the tiny model: every route, the error envelope, health, auth."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from common.identity import weights_fingerprint
from siglip2_embed import Siglip2Service, Siglip2Settings, build_app, load
from tests.helpers import assert_error, image_bytes, photo_like, ready_client, wait_loaded, wait_ready

JPEG = image_bytes(photo_like(64, 48, seed=1), "JPEG")
PNG = image_bytes(photo_like(30, 70, seed=2))


def settings(model: Path, **overrides: Any) -> Siglip2Settings:
    return Siglip2Settings(model=str(model), **overrides)


@pytest.fixture(scope="module")
def client(tiny_siglip: Path) -> Iterator[TestClient]:
    yield from ready_client(build_app(settings(tiny_siglip, max_items_per_request=4, max_image_bytes=200_000)))


def test_health_and_info(client: TestClient, tiny_siglip: Path) -> None:
    health = client.get("/health").json()
    assert health == {
        "status": "ok",
        "model": "siglip2-tiny",
        "version": "1.0",
        "dimension": 32,
        "dimensions": 32,
        "device": "cpu",
        "modalities": ["image", "text"],
        "tiny": True,
        "fingerprint": weights_fingerprint([tiny_siglip]),
        "state": "awake",
    }
    info = client.get("/info").json()
    assert info["dimension"] == 32 and info["dtype"] == "float32" and info["image"]["input_size"] == [64, 64]
    assert info["limits"]["max_items_per_request"] == 4 and info["batching"]["max_batch_size"] == 32
    assert info["text"]["max_tokens"] == 64


def test_the_request_shapes_existing_clients_use(client: TestClient) -> None:
    """The request and response shapes the existing indexers of these services and the README's curl lines use:
    one image as a multipart ``file``, ``{"texts": [...]}`` and ``{"text": ...}`` on /embed/text, /similarity with a
    JSON-array ``texts`` field, and /rank with a ``query`` field."""
    one = client.post("/embed/image", files={"file": ("cat.jpg", JPEG)}).json()
    assert set(one) == {"embedding", "dimension", "dimensions", "model", "version"} and len(one["embedding"]) == 32
    texts = client.post("/embed/text", json={"texts": ["a photo of a cat", "a photo of a dog"]}).json()
    assert len(texts["embeddings"]) == 2 and texts["dimension"] == 32
    single = client.post("/embed/text", json={"text": "a cat"}).json()
    assert len(single["embedding"]) == 32 and single["model"] == "siglip2-tiny"
    files = [("files", ("cat.jpg", JPEG)), ("files", ("dog.png", PNG))]
    sim = client.post("/similarity", files=files, data={"texts": '["a photo of a cat", "a photo of a dog"]'}).json()
    assert np.asarray(sim["similarities"]).shape == (2, 2) and np.asarray(sim["cosine"]).shape == (2, 2)
    assert all(0 < p < 1 for row in sim["similarities"] for p in row)
    ranked = client.post("/rank", files=files, data={"query": "a sunset over mountains"}).json()["rankings"]
    assert sorted(r["index"] for r in ranked) == [0, 1]
    assert ranked[0]["score"] >= ranked[1]["score"] and {r["filename"] for r in ranked} == {"cat.jpg", "dog.png"}


def test_similarity_accepts_repeated_text_fields(client: TestClient) -> None:
    files = [("files", ("a.jpg", JPEG))]
    as_json = client.post("/similarity", files=files, data={"texts": '["a cat", "a dog"]'}).json()
    repeated = client.post("/similarity", files=files, data={"texts": ["a cat", "a dog"]}).json()
    np.testing.assert_allclose(as_json["cosine"], repeated["cosine"], atol=1e-6)


def test_normalize_flag(client: TestClient) -> None:
    raw = client.post("/embed/texts", json={"texts": ["a dog"], "normalize": False}).json()["embeddings"][0]
    unit = client.post("/embed/texts", json={"texts": ["a dog"]}).json()["embeddings"][0]
    assert abs(np.linalg.norm(unit) - 1) < 1e-5 and abs(np.linalg.norm(raw) - 1) > 1e-3
    np.testing.assert_allclose(np.asarray(raw) / np.linalg.norm(raw), unit, atol=1e-6)
    form = client.post("/embed/images", files=[("files", ("a.jpg", JPEG))], data={"normalize": "false"}).json()
    assert abs(np.linalg.norm(form["embeddings"][0]) - 1) > 1e-3


def test_request_id_is_echoed_or_made(client: TestClient) -> None:
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = client.post("/embed/image", files={"file": ("x", b"junk")}).headers["x-request-id"]
    assert len(made) == 32


@pytest.mark.parametrize(
    ("call", "status", "code"),
    [
        (lambda c: c.post("/embed/image", files={"file": ("x.jpg", b"")}), 400, "invalid_image"),
        (lambda c: c.post("/embed/image", files={"file": ("x.png", PNG[:60])}), 400, "invalid_image"),
        (lambda c: c.post("/embed/image", files={"file": ("x.txt", b"hello world")}), 400, "unsupported_image"),
        (lambda c: c.post("/embed/image", files={"file": ("x.jpg", JPEG[: len(JPEG) // 2])}), 400, "invalid_image"),
        (lambda c: c.post("/embed/image", files={"file": ("x.jpg", b"\xff" * 300_000)}), 413, "image_too_large"),
        (lambda c: c.post("/embed/image", data={"normalize": "true"}), 422, "invalid_request"),
        (lambda c: c.post("/embed/image/base64", json={"image_base64": "%%%"}), 400, "invalid_image"),
        (
            lambda c: c.post("/embed/image/base64", json={"image_base64": "data:text/html;base64,PGI+"}),
            400,
            "invalid_image",
        ),
        (lambda c: c.post("/embed/image/base64", json={}), 422, "invalid_request"),
        (lambda c: c.post("/embed/images", json={"images_base64": []}), 422, "invalid_request"),
        (
            lambda c: c.post("/embed/images", content=b"{not json", headers={"content-type": "application/json"}),
            422,
            "invalid_request",
        ),
        (lambda c: c.post("/embed/images", files=[("other", ("a.jpg", JPEG))]), 422, "invalid_request"),
        (lambda c: c.post("/embed/images", files=[("files", ("a.jpg", JPEG))] * 5), 413, "too_many_items"),
        (
            lambda c: c.post("/embed/images", json={"images_base64": [base64.b64encode(PNG).decode()] * 5}),
            413,
            "too_many_items",
        ),
        (
            lambda c: c.post("/embed/images", files=[("files", ("a.jpg", JPEG))], data={"normalize": "maybe"}),
            422,
            "invalid_request",
        ),
        (lambda c: c.post("/embed/text", json={"text": 5}), 422, "invalid_request"),
        (lambda c: c.post("/embed/text", json={"text": ""}), 422, "invalid_request"),
        (lambda c: c.post("/embed/text", json={"text": "a", "texts": ["b"]}), 422, "invalid_request"),
        (lambda c: c.post("/embed/text", json={}), 422, "invalid_request"),
        (lambda c: c.post("/embed/texts", json={"texts": ["a", None]}), 422, "invalid_request"),
        (lambda c: c.post("/embed/texts", json={"texts": ["a"] * 5}), 413, "too_many_items"),
        (lambda c: c.post("/embed/texts", json={"texts": ["a" * 20_001]}), 413, "payload_too_large"),
        (
            lambda c: c.post("/embed/texts", content=b"[1,2", headers={"content-type": "application/json"}),
            422,
            "invalid_request",
        ),
        (
            lambda c: c.post("/similarity", files=[("files", ("a.jpg", JPEG))], data={"texts": '["broken'}),
            422,
            "invalid_request",
        ),
        (
            lambda c: c.post("/similarity", files=[("files", ("a.jpg", JPEG))], data={"texts": "[1, 2]"}),
            422,
            "invalid_request",
        ),
        (lambda c: c.post("/similarity", data={"texts": '["a"]'}), 422, "invalid_request"),
        (lambda c: c.post("/rank", files=[("files", ("a.jpg", JPEG))]), 422, "invalid_request"),
        (
            lambda c: c.post("/rank", files=[("files", ("a.jpg", b"nope"))], data={"query": "x"}),
            400,
            "unsupported_image",
        ),
        (lambda c: c.get("/no/such/route"), 404, "not_found"),
        (lambda c: c.get("/embed/text"), 405, "method_not_allowed"),
    ],
)
def test_bad_requests_get_the_error_envelope(client: TestClient, call: Any, status: int, code: str) -> None:
    assert_error(call(client), status, code)
    assert client.get("/health").status_code == 200  # and the service keeps serving


def test_health_is_503_while_loading_then_200(tiny_siglip: Path) -> None:
    release = threading.Event()
    config = settings(tiny_siglip)

    def slow_load() -> Siglip2Service:
        assert release.wait(30)
        return load(config)

    with TestClient(build_app(config, load=slow_load)) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json() == {"status": "loading"}
        assert_error(client.post("/embed/text", json={"text": "a"}), 503, "not_ready")
        assert client.get("/info").json()["status"] == "loading"
        release.set()
        wait_ready(client)
        assert client.post("/embed/text", json={"text": "a"}).status_code == 200


def test_failed_load_is_unhealthy(tmp_path: Path) -> None:
    with TestClient(build_app(settings(tmp_path / "missing"))) as client:
        response = wait_loaded(client)
        assert response.status_code == 503 and response.json() == {"status": "unhealthy"}
        assert_error(client.post("/embed/text", json={"text": "a"}), 503, "not_ready")


def test_api_key(tiny_siglip: Path) -> None:
    app = build_app(settings(tiny_siglip, api_key="s3cret"))
    with TestClient(app) as client:
        wait_ready(client)  # /health needs no key
        assert_error(client.post("/embed/text", json={"text": "a"}), 401, "invalid_api_key")
        assert_error(client.get("/info", headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
        ok = client.post("/embed/text", json={"text": "a"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
