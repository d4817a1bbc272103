"""Graceful shutdown of a real server process: SIGTERM lets the requests already in flight finish (200, each
with its access log line), then the process exits 0 and stops listening."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.helpers import MIXED_TEXTS, free_port, mixed_images

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # a real server process


@pytest.fixture
def image_server(tiny_siglip: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """siglip2_embed.py as a real process on the tiny model; a batch waits 3 s for more items to arrive."""
    port = free_port()
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
