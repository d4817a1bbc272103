"""Device faults: a batch that runs out of GPU memory is split until it fits (every request still succeeds, an item
that does not fit even alone fails only its own request), and a broken device (any other error from the model)
turns /health unhealthy, without leaking the error to clients."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers import BatchMethod, assert_error, assert_same_vectors, image_app, mixed_images, serving, text_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_out_of_memory_batches_are_split_and_every_request_still_succeeds(tiny_siglip: Path) -> None:
    sizes: list[int] = []

    def oom_over_two(method: BatchMethod) -> BatchMethod:
        def run(items: Sequence[Any]) -> np.ndarray:
            sizes.append(len(items))
            if len(items) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return method(items)

        return run

    def oom_on_boom(method: BatchMethod) -> BatchMethod:
        def run(texts: Sequence[str]) -> np.ndarray:
            if "boom" in texts:  # an item that does not fit even alone
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return method(texts)

        return run

    images = mixed_images()
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

    def fail_when_broken(method: BatchMethod) -> BatchMethod:
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
