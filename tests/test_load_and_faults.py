"""Under load and when things break: batching never mixes rows, a full queue is an immediate 429, a slow model a
503 timeout, out-of-memory batches are split, a broken device turns /health unhealthy, the API key guards every
route but /health and /metrics, CORS is off by default, and SIGTERM drains in-flight requests."""

from __future__ import annotations

import base64
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from qwen3_embed import Qwen3Encoder, Qwen3Service, Qwen3Settings
from qwen3_embed import build_app as build_text_app
from siglip2_embed import Siglip2Encoder, Siglip2Service, Siglip2Settings
from siglip2_embed import build_app as build_image_app
from tests.conftest import image_bytes, photo_like, wait_ready
from tests.test_siglip_http import assert_error

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models under many client threads: OpenMP workers spinning against them on a 2-core machine make each
    matmul of a tiny model up to 50x slower than one thread does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextmanager
def serving(app: FastAPI) -> Iterator[TestClient]:
    # What a real client sees: a 500 response, not the server's exception re-raised in the test.
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


def image_app(
    model: Path,
    *,
    wrap_images: Callable[[Any], Any] | None = None,
    wrap_texts: Callable[[Any], Any] | None = None,
    **overrides: Any,
) -> FastAPI:
    """The image service on the tiny model, with its encoder's batch methods optionally wrapped (slow, failing)."""
    settings = Siglip2Settings(model=str(model), **overrides)

    def load() -> Siglip2Service:
        encoder = Siglip2Encoder(str(model), CPU, torch.float32)
        encoder.embed_texts(["warm-up"])  # as load does, before any wrapper
        if wrap_images is not None:
            encoder.embed_images = wrap_images(encoder.embed_images)  # type: ignore[method-assign]
        if wrap_texts is not None:
            encoder.embed_texts = wrap_texts(encoder.embed_texts)  # type: ignore[method-assign]
        return Siglip2Service(settings, encoder, "cpu")

    return build_image_app(settings, load=load)


def text_app(model: Path, *, wrap_texts: Callable[[Any], Any] | None = None, **overrides: Any) -> FastAPI:
    settings = Qwen3Settings(model=str(model), **overrides)

    def load() -> Qwen3Service:
        encoder = Qwen3Encoder(str(model), CPU, torch.float32, max_batch_tokens=settings.max_batch_tokens)
        encoder.embed_texts(["warm-up"])
        if wrap_texts is not None:
            encoder.embed_texts = wrap_texts(encoder.embed_texts)  # type: ignore[method-assign]
        return Qwen3Service(settings, encoder, "cpu")

    return build_text_app(settings, load=load)


def blocking(release: threading.Event) -> Callable[[Any], Any]:
    """Wrap a batch method so that it waits for ``release`` (a model that is busy for as long as a test wants)."""

    def wrap(method: Callable[[Sequence[Any]], np.ndarray]) -> Callable[[Sequence[Any]], np.ndarray]:
        def run(items: Sequence[Any]) -> np.ndarray:
            assert release.wait(30)
            return method(items)

        return run

    return wrap


def mean_batch_size(client: TestClient, batcher: str) -> float:
    """From /metrics: items per forward pass, averaged."""
    lines = client.get("/metrics").text.splitlines()
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in lines
        if line.startswith(("embed_batch_size_sum", "embed_batch_size_count")) and f'batcher="{batcher}"' in line
    }
    total = values[f'embed_batch_size_sum{{batcher="{batcher}"}}']
    count = values[f'embed_batch_size_count{{batcher="{batcher}"}}']
    return total / count


def assert_same_vectors(got: Sequence[Sequence[float]], expected: Sequence[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for vector, reference in zip(got, expected, strict=True):
        np.testing.assert_allclose(vector, reference, atol=2e-5)
        assert float(np.dot(vector, reference)) >= 0.9999


# --- every response carries exactly its own rows ------------------------------------------------------------------


def _images() -> list[bytes]:
    """Different formats and sizes, from 1 x 1 to 800 x 600."""
    sizes = [(1, 1), (16, 9), (64, 64), (97, 31), (200, 300), (640, 480), (800, 600), (33, 700)]
    formats = [("PNG", {}), ("JPEG", {"quality": 85}), ("WEBP", {}), ("BMP", {}), ("GIF", {}), ("TIFF", {})]
    images = []
    for index, (width, height) in enumerate(sizes):
        fmt, args = formats[index % len(formats)]
        photo = photo_like(width, height, seed=index + 10)
        images.append(image_bytes(photo if fmt != "GIF" else photo.convert("P"), fmt, **args))
    return images


TEXTS = [
    "a photo of a cat",
    "a dog on the sea",
    "red tree",
    "the sun",
    "一只猫在晒太阳",
    "👩‍👩‍👧‍👦",
    "a blue photo of a red cat and a dog in the tree on the sea " * 3,
    "x",
    "مرحبا",
    "sea and sun and tree",
]


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_concurrent_mixed_image_service_requests_keep_their_rows(tiny_siglip: Path) -> None:
    images = _images()
    with serving(image_app(tiny_siglip, max_batch_size=16, max_batch_wait_ms=3)) as client:
        # One by one first: the vector each input gets alone.
        alone_images = [
            np.asarray(client.post("/embed/image", files={"file": ("x", data)}).json()["embedding"]) for data in images
        ]
        alone_texts = [np.asarray(client.post("/embed/text", json={"text": t}).json()["embedding"]) for t in TEXTS]

        rng = random.Random(6)
        jobs: list[tuple[str, list[int], list[int]]] = []  # (kind, image indices, text indices)
        kinds = ["image", "image_b64", "images_multipart", "images_json", "text", "texts", "v1", "v1_images"]
        for _ in range(320):
            kind = rng.choice(kinds)
            image_ids = [rng.randrange(len(images)) for _ in range(rng.randint(1, 5))]
            text_ids = [rng.randrange(len(TEXTS)) for _ in range(rng.randint(1, 5))]
            jobs.append((kind, image_ids, text_ids))

        def run(job: tuple[str, list[int], list[int]]) -> tuple[list[Any], list[np.ndarray]]:
            kind, image_ids, text_ids = job
            encoded = [base64.b64encode(images[i]).decode() for i in image_ids]
            if kind == "image":
                body = client.post("/embed/image", files={"file": ("x", images[image_ids[0]])}).json()
                return [body["embedding"]], [alone_images[image_ids[0]]]
            if kind == "image_b64":
                body = client.post("/embed/image/base64", json={"image_base64": encoded[0]}).json()
                return [body["embedding"]], [alone_images[image_ids[0]]]
            if kind == "images_multipart":
                files = [("files", (f"{i}.img", images[i])) for i in image_ids]
                return client.post("/embed/images", files=files).json()["embeddings"], [
                    alone_images[i] for i in image_ids
                ]
            if kind == "images_json":
                body = client.post("/embed/images", json={"images_base64": encoded}).json()
                return body["embeddings"], [alone_images[i] for i in image_ids]
            if kind == "text":
                body = client.post("/embed/text", json={"text": TEXTS[text_ids[0]]}).json()
                return [body["embedding"]], [alone_texts[text_ids[0]]]
            if kind == "texts":
                body = client.post("/embed/texts", json={"texts": [TEXTS[i] for i in text_ids]}).json()
                return body["embeddings"], [alone_texts[i] for i in text_ids]
            # /v1/embeddings: texts, and on the image service data:image URIs mixed in between them
            inputs: list[str] = [TEXTS[i] for i in text_ids]
            expected = [alone_texts[i] for i in text_ids]
            if kind == "v1_images":
                for position, i in enumerate(image_ids):
                    inputs.insert(position * 2, _data_uri(images[i]))
                    expected.insert(position * 2, alone_images[i])
            body = client.post("/v1/embeddings", json={"input": inputs}).json()
            assert [item["index"] for item in body["data"]] == list(range(len(inputs)))
            return [item["embedding"] for item in body["data"]], expected

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(run, jobs))
        assert len(results) == len(jobs)  # none lost
        for got, expected in results:
            assert_same_vectors(got, expected)
        # and the batcher really merged requests (otherwise this test would prove nothing)
        assert mean_batch_size(client, "images") > 1.5 and mean_batch_size(client, "texts") > 1.5


def test_concurrent_text_service_requests_keep_their_rows(tiny_zimage: Path) -> None:
    # Texts of very different lengths, sorted by length inside a batch and cut into several forward passes.
    texts = [*TEXTS, "word " * 60, "a b c " * 20, "猫" * 40]
    app = text_app(tiny_zimage, max_batch_size=24, max_batch_wait_ms=3, max_batch_tokens=256)
    with serving(app) as client:
        alone = [np.asarray(client.post("/embed/text", json={"text": t}).json()["embedding"]) for t in texts]
        rng = random.Random(7)
        jobs = [
            (rng.choice(["text", "texts", "v1"]), [rng.randrange(len(texts)) for _ in range(rng.randint(1, 6))])
            for _ in range(240)
        ]

        def run(job: tuple[str, list[int]]) -> tuple[list[Any], list[np.ndarray]]:
            kind, ids = job
            if kind == "text":
                return [client.post("/embed/text", json={"text": texts[ids[0]]}).json()["embedding"]], [alone[ids[0]]]
            if kind == "texts":
                body = client.post("/embed/texts", json={"texts": [texts[i] for i in ids]}).json()
                return body["embeddings"], [alone[i] for i in ids]
            body = client.post("/v1/embeddings", json={"input": [texts[i] for i in ids]}).json()
            return [item["embedding"] for item in body["data"]], [alone[i] for i in ids]

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(run, jobs))
        assert len(results) == len(jobs)
        for got, expected in results:
            assert_same_vectors(got, expected)
        assert mean_batch_size(client, "texts") > 1.5


# --- overload: queue full, timeout --------------------------------------------------------------------------------


def test_full_queue_is_an_immediate_429_with_retry_after(tiny_siglip: Path) -> None:
    release = threading.Event()
    app = image_app(tiny_siglip, wrap_texts=blocking(release), max_batch_size=1, max_batch_wait_ms=0, max_queue_items=3)
    with serving(app) as client:
        service = app.state.runtime.model
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, "/embed/texts", json={"texts": ["a", "b", "c"]})
            deadline = time.monotonic() + 10
            while service.text_batcher.queue_depth < 2:  # "a" is in the model, "b" and "c" wait
                assert time.monotonic() < deadline
                time.sleep(0.005)
            started = time.perf_counter()
            rejected = client.post("/embed/texts", json={"texts": ["d", "e"]})
            elapsed = time.perf_counter() - started
            assert_error(rejected, 429, "queue_full")
            assert rejected.headers["retry-after"] == "1" and elapsed < 1.0  # at once, not after the model is free
            assert client.get("/health").status_code == 200  # overloaded is not unhealthy
            release.set()
            answer = first.result(timeout=30)
        assert answer.status_code == 200 and len(answer.json()["embeddings"]) == 3
        assert client.post("/embed/texts", json={"texts": ["d", "e"]}).status_code == 200


def test_request_timeout_is_503_timeout(tiny_zimage: Path) -> None:
    release = threading.Event()
    app = text_app(tiny_zimage, wrap_texts=blocking(release), request_timeout_s=0.3)
    with serving(app) as client:
        started = time.perf_counter()
        response = client.post("/embed/text", json={"text": "a slow one"})
        elapsed = time.perf_counter() - started
        error = assert_error(response, 503, "timeout")
        assert "0.3 s" in error["message"] and response.headers["retry-after"]
        assert 0.25 < elapsed < 5
        release.set()
        assert client.post("/embed/text", json={"text": "a fast one"}).status_code == 200
        assert client.get("/health").status_code == 200


# --- device faults: out of memory, a broken device ----------------------------------------------------------------


def test_out_of_memory_batches_are_split_and_every_request_still_succeeds(tiny_siglip: Path) -> None:
    sizes: list[int] = []

    def oom_over_two(method: Callable[[Sequence[Any]], np.ndarray]) -> Callable[[Sequence[Any]], np.ndarray]:
        def run(items: Sequence[Any]) -> np.ndarray:
            sizes.append(len(items))
            if len(items) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return method(items)

        return run

    def oom_on_boom(method: Callable[[Sequence[str]], np.ndarray]) -> Callable[[Sequence[str]], np.ndarray]:
        def run(texts: Sequence[str]) -> np.ndarray:
            if "boom" in texts:  # an item that does not fit even alone
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return method(texts)

        return run

    images = _images()
    app = image_app(tiny_siglip, wrap_images=oom_over_two, wrap_texts=oom_on_boom, max_batch_wait_ms=50)
    with serving(app) as client:
        alone = [np.asarray(client.post("/embed/image", files={"file": ("x", d)}).json()["embedding"]) for d in images]
        sizes.clear()
        requests_ = [[0, 1, 2, 3], [4, 5, 6], [7, 0, 1, 2, 3], [5]]
        with ThreadPoolExecutor(len(requests_)) as pool:
            answers = list(
                pool.map(
                    lambda ids: client.post("/embed/images", files=[("files", ("x", images[i])) for i in ids]),
                    requests_,
                )
            )
        for ids, answer in zip(requests_, answers, strict=True):
            assert answer.status_code == 200, answer.text
            assert_same_vectors(answer.json()["embeddings"], [alone[i] for i in ids])
        assert max(sizes) > 2  # a batch did run out of memory and was split
        expected_ok = client.post("/embed/text", json={"text": "ok"}).json()["embedding"]
        with ThreadPoolExecutor(2) as pool:
            boom = pool.submit(client.post, "/embed/texts", json={"texts": ["boom"]})
            fine = pool.submit(client.post, "/embed/texts", json={"texts": ["ok"]})
            assert_error(boom.result(), 503, "out_of_memory")
            assert_same_vectors(fine.result().json()["embeddings"], [np.asarray(expected_ok)])
        assert client.get("/health").status_code == 200  # running out of memory is not a broken device


def test_a_broken_device_turns_health_unhealthy(tiny_zimage: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = threading.Event()

    def fail_when_broken(method: Callable[[Sequence[str]], np.ndarray]) -> Callable[[Sequence[str]], np.ndarray]:
        def run(texts: Sequence[str]) -> np.ndarray:
            if broken.is_set():
                raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
            return method(texts)

        return run

    with serving(text_app(tiny_zimage, wrap_texts=fail_when_broken)) as client:
        assert client.post("/embed/text", json={"text": "fine"}).status_code == 200
        broken.set()
        with caplog.at_level(logging.ERROR):
            for attempt in range(3):
                response = client.post("/embed/text", json={"text": f"attempt {attempt}"})
                error = assert_error(response, 500, "internal_error")
                assert "illegal memory access" not in response.text and "Traceback" not in response.text
                assert response.headers["x-request-id"] in error["message"]  # the id to find it in the log
        health = client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "unhealthy"}
        assert_error(client.post("/embed/text", json={"text": "after"}), 503, "not_ready")
        assert "marking the service unhealthy" in caplog.text and "illegal memory access" in caplog.text


# --- who gets in: API key, CORS, request ids ------------------------------------------------------------------------

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


# --- SIGTERM drains in-flight requests ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def image_server(tiny_siglip: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """siglip2_embed.py as a real process on the tiny model; a batch waits 3 s for more items to arrive."""
    port = _free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name in ("EMBED_API_KEY", "EMBED_LOG_FILE", "SIGLIP2_LOG_FILE", "EMBED_HOST"):
        env.pop(name, None)  # a plain local server, logging to stdout
    command = [sys.executable, "siglip2_embed.py", "--model", str(tiny_siglip), "--port", str(port)]
    command += ["--log-level", "info", "--max-batch-wait-ms", "3000", "--device", "cpu"]
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield process, url, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_then_exits_0(
    image_server: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    process, url, log = image_server
    images = _images()
    finished_at: list[float] = []

    def send(index: int) -> requests.Response:
        files = {"file": (f"{index}.png", images[index])} if index % 2 else None
        if files:
            response = requests.post(f"{url}/embed/image", files=files, timeout=60)
        else:
            response = requests.post(f"{url}/embed/text", json={"text": TEXTS[index]}, timeout=60)
        finished_at.append(time.monotonic())
        return response

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(send, index) for index in range(6)]
        time.sleep(1.0)  # all six have arrived and wait for their batch (3 s window)
        assert not any(future.done() for future in futures)
        terminated_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        responses = [future.result(timeout=60) for future in futures]
    assert [response.status_code for response in responses] == [200] * 6, [r.text for r in responses]
    assert min(finished_at) > terminated_at  # they really were in flight when SIGTERM came
    assert process.wait(timeout=30) == 0, log.read_text()
    with pytest.raises(requests.ConnectionError):  # and nothing listens any more
        requests.get(f"{url}/health", timeout=2)
    text = log.read_text()
    assert "Traceback" not in text, text
    assert text.count("POST /embed/") == 6  # the access log line of every drained request
