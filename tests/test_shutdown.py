"""Graceful shutdown of a real server process: SIGTERM lets the requests already in flight finish (200, each
with its access log line), then the process exits 0 and stops listening."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.helpers import MIXED_TEXTS, mixed_images
from tests.live_server import service_process

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # a real server process


@pytest.fixture
def image_server(tiny_siglip: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """siglip2_embed.py as a real process on the tiny model; a batch waits 3 s for more items to arrive."""
    log = tmp_path / "server.log"
    args = ("--log-level", "info", "--max-batch-wait-ms", "3000")
    with service_process("siglip2_embed.py", tiny_siglip, log, *args) as (process, url):
        yield process, url, log


def test_sigterm_drains_in_flight_requests_then_exits_0(
    image_server: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    process, url, log = image_server
    images = mixed_images()
    finished_at: list[float] = []

    def send(index: int) -> requests.Response:
        files = {"file": (f"{index}.png", images[index])} if index % 2 else None
        if files:
            response = requests.post(f"{url}/embed/image", files=files, timeout=60)
        else:
            response = requests.post(f"{url}/embed/text", json={"text": MIXED_TEXTS[index]}, timeout=60)
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
