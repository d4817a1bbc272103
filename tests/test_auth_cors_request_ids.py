"""Who gets in, and how requests are told apart: the API key guards every route but /health and /metrics (and a
blank key locks everyone out), CORS is off unless origins are configured, and every response carries an
X-Request-ID that is also in the access log."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.helpers import assert_error, image_app, image_bytes, photo_like, serving, text_app, wait_ready

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PNG = image_bytes(photo_like(20, 20, seed=1))
PNG_B64 = base64.b64encode(PNG).decode()
IMAGE_ROUTES: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/info", {}),
    ("POST", "/embed/image", {"files": {"file": ("a.png", PNG)}}),
    ("POST", "/embed/image/base64", {"json": {"image_base64": PNG_B64}}),
    ("POST", "/embed/images", {"files": [("files", ("a.png", PNG))]}),
    ("POST", "/embed/images", {"json": {"images_base64": [PNG_B64]}}),
    ("POST", "/embed/text", {"json": {"text": "a"}}),
    ("POST", "/embed/texts", {"json": {"texts": ["a"]}}),
    ("POST", "/similarity", {"files": [("files", ("a.png", PNG))], "data": {"texts": '["a"]'}}),
    ("POST", "/rank", {"files": [("files", ("a.png", PNG))], "data": {"query": "a"}}),
    ("POST", "/v1/embeddings", {"json": {"input": "a"}}),
]
TEXT_ROUTES = [
    route for route in IMAGE_ROUTES if route[1] in ("/info", "/embed/text", "/embed/texts", "/v1/embeddings")
]
REJECTED_HEADERS = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer wrong"},
    {"Authorization": "Bearer s3cre"},
    {"Authorization": "Bearer s3cret2"},
    {"Authorization": "Bearer s3 cret"},
    {"Authorization": "Basic s3cret"},
    {"Authorization": "s3cret"},
    {"Authorization": "Token s3cret"},
    {"X-API-Key": "s3cret"},
]
ACCEPTED_HEADERS = [
    {"Authorization": "Bearer s3cret"},
    {"Authorization": "bearer s3cret"},  # the scheme is case-insensitive (RFC 9110)
    {"Authorization": "Bearer s3cret "},  # surrounding whitespace is not part of the key
]


def _request(client: TestClient, method: str, path: str, kwargs: dict[str, Any], headers: dict[str, str]) -> Any:
    return client.request(method, path, headers=headers, **kwargs)


@pytest.mark.parametrize(
    ("build", "routes"),
    [(image_app, IMAGE_ROUTES), (text_app, TEXT_ROUTES)],
    ids=["image-service", "text-service"],
)
def test_api_key_guards_every_route_but_health_and_metrics(
    tiny_siglip: Path, tiny_zimage: Path, build: Callable[..., FastAPI], routes: list[Any]
) -> None:
    model = tiny_siglip if build is image_app else tiny_zimage
    with serving(build(model, api_key="s3cret")) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200
        for method, path, kwargs in routes:
            for headers in REJECTED_HEADERS:
                response = _request(client, method, path, kwargs, headers)
                assert_error(response, 401, "invalid_api_key")
                assert response.headers["www-authenticate"] == "Bearer" and "s3cret" not in response.text
            for headers in ACCEPTED_HEADERS:
                response = _request(client, method, path, kwargs, headers)
                assert response.status_code == 200, (path, headers, response.text)
        # The key is checked before the body is even parsed: a junk body without a key is 401, not 422.
        assert_error(client.post("/embed/text", content=b"{junk"), 401, "invalid_api_key")


def test_a_blank_api_key_locks_everyone_out(tiny_zimage: Path) -> None:
    """EMBED_API_KEY= set but empty must not mean "Bearer <nothing>" gets in."""
    with serving(text_app(tiny_zimage, api_key="")) as client:
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer"}):
            assert_error(client.post("/embed/text", json={"text": "a"}, headers=headers), 401, "invalid_api_key")


def test_cors_is_off_unless_origins_are_configured(tiny_zimage: Path) -> None:
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    with serving(text_app(tiny_zimage)) as client:
        response = client.options("/embed/text", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
        response = client.post("/embed/text", json={"text": "a"}, headers={"Origin": "http://evil.example"})
        # A post from a foreign origin is refused outright (403), not only left unreadable.
        assert response.status_code == 403 and "access-control-allow-origin" not in response.headers
    allowed = "http://localhost:3000"
    with serving(text_app(tiny_zimage, cors_origins=[allowed])) as client:
        response = client.options("/embed/text", headers={**preflight, "Origin": allowed})
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == allowed
        response = client.options("/embed/text", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
        response = client.post("/embed/text", json={"text": "a"}, headers={"Origin": allowed})
        assert response.headers["access-control-allow-origin"] == allowed
        assert "x-request-id" in response.headers["access-control-expose-headers"].lower()


def test_request_id_is_on_every_response_and_in_the_access_log(
    tiny_zimage: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with serving(text_app(tiny_zimage, max_body_bytes=1000)) as client:
        calls: list[Callable[[dict[str, str]], Any]] = [
            lambda h: client.get("/health", headers=h),
            lambda h: client.get("/metrics", headers=h),
            lambda h: client.post("/embed/text", json={"text": "a"}, headers=h),
            lambda h: client.post("/embed/text", json={"text": 1}, headers=h),
            lambda h: client.post(
                "/embed/text", content=b"{" * 2000, headers={**h, "content-type": "application/json"}
            ),
            lambda h: client.get("/nowhere", headers=h),
        ]
        with caplog.at_level(logging.INFO, logger="embed.access"):
            for index, call in enumerate(calls):
                request_id = f"hardening-{index}"
                assert call({"X-Request-ID": request_id}).headers["x-request-id"] == request_id
                assert request_id in caplog.text
                made = call({"X-Request-ID": "bad\nid"}).headers["x-request-id"]  # not printable: replaced
                assert len(made) == 32 and made in caplog.text


def test_the_api_key_holds_under_a_path_prefix(tiny_zimage: Path) -> None:
    """Mounted under a prefix (a Ray Serve route prefix, a proxy's root path) the app sees the prefix in the path:
    the key check must still find its routes."""
    app = text_app(tiny_zimage, api_key="secret")
    with TestClient(app, base_url="http://testserver/qwen3", root_path="/qwen3") as client:
        wait_ready(client)
        assert_error(client.post("/embed/texts", json={"texts": ["a"]}), 401, "invalid_api_key")
        ok = client.post("/embed/texts", json={"texts": ["a"]}, headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 200
