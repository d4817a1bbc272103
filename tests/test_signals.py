"""Stopping: every stop signal drains (SIGHUP too), work still queued when the drain time is over is answered with
a JSON 503 and Retry-After (not uvicorn's plain-text 500 and a traceback per request), and the batcher's ``close``
fails exactly what has not started."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

import common.server
from common.batching import MicroBatcher
from common.errors import NotReady
from tests.live_server import service_process, started_server, text_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def post_all(url: str, count: int) -> tuple[ThreadPoolExecutor, list[Any]]:
    pool = ThreadPoolExecutor(count)
    futures = [
        pool.submit(requests.post, f"{url}/embed/text", json={"text": f"text {index}"}, timeout=60)
        for index in range(count)
    ]
    return pool, futures


def assert_retry_later(response: requests.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json" and response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "not_ready"


@pytest.mark.slow
def test_work_still_queued_after_the_drain_gets_503_retry_after(tiny_zimage: Path, tmp_path: Path) -> None:
    """SIGTERM with more queued work than the drain time: each waiting request gets a JSON 503 with Retry-After,
    the process exits 0, and the log has no traceback."""
    log = tmp_path / "server.log"
    # A batch waits 20 s for more items: what is queued cannot finish within the 1 s drain.
    env = {"EMBED_SHUTDOWN_TIMEOUT_S": "1"}
    with service_process("qwen3_embed.py", tiny_zimage, log, "--max-batch-wait-ms", "20000", env=env) as (process, url):
        pool, futures = post_all(url, 4)
        time.sleep(1.0)
        assert not any(future.done() for future in futures)
        terminated = time.monotonic()
        process.send_signal(signal.SIGTERM)
        responses = [future.result(timeout=30) for future in futures]
        answered = time.monotonic() - terminated
        pool.shutdown()
        for response in responses:
            assert_retry_later(response)
        assert answered < 10  # measured: 1.1 s (the drain time); uvicorn's own cut-off came after 30 s
        assert process.wait(timeout=30) == 0, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text, text
    assert text.count("POST /embed/text 503") == 4, text


@pytest.mark.slow
def test_sighup_drains_like_sigterm(tiny_zimage: Path, tmp_path: Path) -> None:
    """A service started by hand whose terminal closes gets SIGHUP: it used to die at once, mid-request."""
    log = tmp_path / "server.log"
    with service_process("qwen3_embed.py", tiny_zimage, log, "--max-batch-wait-ms", "2000") as (process, url):
        pool, futures = post_all(url, 3)
        time.sleep(0.5)
        hung_up = time.monotonic()
        process.send_signal(signal.SIGHUP)
        responses = [future.result(timeout=30) for future in futures]
        pool.shutdown()
        assert [response.status_code for response in responses] == [200] * 3, [r.text for r in responses]
        assert process.wait(timeout=30) == 0, log.read_text()
        assert time.monotonic() - hung_up >= 1.0  # the batch window was waited for: drained, not killed
    assert "Traceback" not in log.read_text()


def blocked_until(release: threading.Event) -> Callable[[Any], Any]:
    def wrap(method: Callable[[Sequence[str]], np.ndarray]) -> Callable[[Sequence[str]], np.ndarray]:
        def run(texts: Sequence[str]) -> np.ndarray:
            if "stuck" in texts:
                assert release.wait(60)
            return method(texts)

        return run

    return wrap


def test_a_request_still_running_after_the_grace_period_gets_503(
    tiny_zimage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward pass that outlasts the drain and the grace period: uvicorn cancels the request, which is answered
    with the JSON 503 (it was a plain-text 500 and an ERROR traceback)."""
    monkeypatch.setattr(common.server, "SHUTDOWN_GRACE_S", 0.5)
    release = threading.Event()
    app, settings = text_app(tiny_zimage, wrap_texts=blocked_until(release), shutdown_timeout_s=0.2)
    try:
        with started_server(app, settings) as (url, server), ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(requests.post, f"{url}/embed/text", json={"text": "stuck"}, timeout=60)
            time.sleep(0.5)  # on the model now
            server.should_exit = True  # what SIGTERM does
            assert_retry_later(stuck.result(timeout=30))
            release.set()
    finally:
        release.set()


def test_close_fails_what_has_not_started_and_everything_after() -> None:
    async def scenario() -> None:
        started, release = threading.Event(), threading.Event()

        def run(items: list[str]) -> list[str]:
            started.set()
            release.wait(10)
            return items

        with ThreadPoolExecutor(1) as pool:
            batcher: MicroBatcher[str, str] = MicroBatcher(run, executor=pool, max_batch_size=2, max_wait_s=0.05)
            batcher.start()
            running = asyncio.create_task(batcher.submit(["a", "b"]))
            await asyncio.to_thread(started.wait, 10)
            queued = asyncio.create_task(batcher.submit(["c", "d", "e"]))
            await asyncio.sleep(0.1)  # queued behind the batch on the model
            batcher.close("the service is shutting down")
            release.set()
            assert await running == ["a", "b"]  # the batch on the model finishes
            with pytest.raises(NotReady, match="shutting down"):
                await queued
            with pytest.raises(NotReady):
                await batcher.submit(["f"])
            assert batcher.queue_depth == 0
            await batcher.stop()

    asyncio.run(scenario())
