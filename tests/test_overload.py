"""Overload: a full queue is an immediate 429 with Retry-After, and a request that waits longer than
--request-timeout-s for the model is a 503 timeout; neither makes the service unhealthy."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import BatchMethod, assert_error, image_app, serving, text_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class BusyModel:
    """Wraps an encoder's batch method so that every call waits for ``release``: a model that is busy for as long
    as a test wants. ``busy`` says whether a call is inside the model right now."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self._inside = 0
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._inside > 0

    def wrap(self, method: BatchMethod) -> BatchMethod:
        def run(items: Any) -> np.ndarray:
            with self._lock:
                self._inside += 1
            try:
                assert self.release.wait(30)
                return method(items)
            finally:
                with self._lock:
                    self._inside -= 1

        return run


def test_full_queue_is_an_immediate_429_with_retry_after(tiny_siglip: Path) -> None:
    model = BusyModel()
    app = image_app(tiny_siglip, wrap_texts=model.wrap, max_batch_size=1, max_batch_wait_ms=0, max_queue_items=3)
    with serving(app) as client:
        service = app.state.runtime.model
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, "/embed/texts", json={"texts": ["a", "b", "c"]})
            deadline = time.monotonic() + 10
            while service.text_batcher.queue_depth < 2:  # "a" is in the model, "b" and "c" wait
                assert time.monotonic() < deadline
                time.sleep(0.005)
            rejected = client.post("/embed/texts", json={"texts": ["d", "e"]})
            assert_error(rejected, 429, "queue_full")
            assert rejected.headers["retry-after"] == "1"
            # At once, not after the model is free: it is still busy with "a", and the first request waits.
            assert model.busy and not first.done()
            assert client.get("/health").status_code == 200  # overloaded is not unhealthy
            model.release.set()
            answer = first.result(timeout=30)
        assert answer.status_code == 200 and len(answer.json()["embeddings"]) == 3
        assert client.post("/embed/texts", json={"texts": ["d", "e"]}).status_code == 200


def test_request_timeout_is_503_timeout(tiny_zimage: Path) -> None:
    model = BusyModel()
    app = text_app(tiny_zimage, wrap_texts=model.wrap, request_timeout_s=0.3)
    with serving(app) as client:
        started = time.perf_counter()
        response = client.post("/embed/text", json={"text": "a slow one"})
        elapsed = time.perf_counter() - started
        error = assert_error(response, 503, "timeout")
        assert "0.3 s" in error["message"] and response.headers["retry-after"]
        assert elapsed > 0.25  # it waited for its timeout ...
        assert model.busy  # ... and no longer: the model is still busy with it
        model.release.set()
        assert client.post("/embed/text", json={"text": "a fast one"}).status_code == 200
        assert client.get("/health").status_code == 200
