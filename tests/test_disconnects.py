"""Clients that go away: their requests are cancelled, their queued rows never reach the model, and a connection
that closes after pipelining requests leaves no tracebacks behind."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from common.batching import MicroBatcher
from tests.live_server import connect, json_request, server_thread, service_process, text_app

SLOW_BATCH_S = 0.1

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def slow_and_recorded(seen: list[str]) -> Callable[[Any], Any]:
    """A model that takes SLOW_BATCH_S per batch and records every text it is given."""

    def wrap(method: Callable[[Sequence[str]], np.ndarray]) -> Callable[[Sequence[str]], np.ndarray]:
        def run(texts: Sequence[str]) -> np.ndarray:
            seen.extend(texts)
            time.sleep(SLOW_BATCH_S)
            return method(texts)

        return run

    return wrap


def metric(url: str, name: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_abandoned_requests_never_reach_the_model(tiny_zimage: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Ten requests of 256 texts, their clients gone after 0.3 s: they used to run 80 batches of model work while a
    legitimate request waited behind them."""
    seen: list[str] = []
    app, settings = text_app(tiny_zimage, wrap_texts=slow_and_recorded(seen))
    with caplog.at_level(logging.INFO, logger="embed.access"), server_thread(app, settings) as url:
        seen.clear()
        clients = [connect(url) for _ in range(10)]
        for index, sock in enumerate(clients):
            sock.sendall(json_request("/embed/texts", {"texts": [f"abandoned {index} {j}" for j in range(256)]}))
        time.sleep(0.3)
        for sock in clients:
            sock.close()
        legit = [f"legit {j}" for j in range(4)]
        started = time.monotonic()
        response = requests.post(f"{url}/embed/texts", json={"texts": legit}, timeout=60)
        waited = time.monotonic() - started
        assert response.status_code == 200
        abandoned_run = sum(text.startswith("abandoned") for text in seen)
        time.sleep(3 * SLOW_BATCH_S)
        assert sum(text.startswith("abandoned") for text in seen) == abandoned_run  # nothing more after
        # Only the batches that ran in the first 0.3 s and the one on the model when they left (measured: 96 of
        # 2560); it was all 2560.
        assert abandoned_run < 2560 // 4, abandoned_run
        assert waited < 3.0  # measured: 0.2 s (one batch in progress, then its own); it was 8 s and more
        assert metric(url, "embed_queue_depth") == 0
        # Each row is its own: the same texts alone give the same vectors.
        for text, vector in zip(legit, response.json()["embeddings"], strict=True):
            alone = requests.post(f"{url}/embed/text", json={"text": text}, timeout=10).json()["embedding"]
            np.testing.assert_allclose(vector, alone, atol=2e-5)
    gone = [r.getMessage() for r in caplog.records if r.name == "embed.access" and " 499 " in r.getMessage()]
    assert len(gone) == 10, gone


def test_a_request_cancelled_while_its_batch_gathers_drops_its_rows() -> None:
    """The batcher skips rows of callers that are gone, also among those already taken for the next batch."""

    async def scenario() -> list[list[str]]:
        batches: list[list[str]] = []

        def run(items: list[str]) -> list[str]:
            batches.append(items)
            return items

        with ThreadPoolExecutor(1) as pool:
            batcher: MicroBatcher[str, str] = MicroBatcher(run, executor=pool, max_batch_size=8, max_wait_s=0.3)
            batcher.start()
            gone = asyncio.create_task(batcher.submit(["gone 1", "gone 2"]))
            await asyncio.sleep(0.05)  # taken from the queue, waiting for more
            stays = asyncio.create_task(batcher.submit(["stays"]))
            await asyncio.sleep(0.05)
            gone.cancel()
            assert await stays == ["stays"]
            assert batcher.queue_depth == 0
            await batcher.stop()
        return batches

    assert asyncio.run(scenario()) == [["stays"]]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["half-close", "close"])
def test_pipelined_requests_then_a_close_log_no_traceback(tiny_siglip: Path, tmp_path: Path, how: str) -> None:
    """Two pipelined requests, then the client closes: uvicorn wrote the first response to the closed transport
    and logged two ERROR tracebacks (about 125 lines) per connection, while the access log said 200."""
    log = tmp_path / "server.log"
    with service_process("siglip2_embed.py", tiny_siglip, log, "--log-level", "info") as (process, url):
        for _ in range(3):
            with connect(url) as sock:
                one = json_request("/embed/text", {"text": "a cat"})
                sock.sendall(one + one)
                if how == "half-close":
                    sock.shutdown(socket.SHUT_WR)
            time.sleep(0.5)
        assert requests.post(f"{url}/embed/text", json={"text": "still serving"}, timeout=10).status_code == 200
        text = log.read_text()
        assert "Traceback" not in text and " ERROR " not in text, text
        assert process.poll() is None
