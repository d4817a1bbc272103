"""A client that hangs up during ``POST /admin/sleep`` (a read timeout, Ctrl-C on the command line, a generator
script's own timeout) never leaves the service dead: the sleep, once started, completes whatever the client does,
the state always says where the weights are, and the next embedding request wakes the model and gets the vectors of
before. For both sleep modes (offload's code path runs on the CPU too), the client hanging up while the sleep waits
for the work on the model, while the weights are released, and while it waits for a wake to end, and for the
command line with a tiny ``--timeout``."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch

from common.residency import SleepMode
from qwen3_embed import Qwen3Encoder, Qwen3Service, Qwen3Settings
from qwen3_embed import build_app as build_text_app
from tests.helpers import CPU, serve_in_thread

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
SLOW_S = 0.8  # a release, a restore or a batch that takes this long (a large model on a busy card)


def slow_encoder(encoder: Qwen3Encoder, slow_batches: threading.Event) -> None:
    """Releases and restores take SLOW_S; while ``slow_batches`` is set, so do forward passes."""
    release, restore, encode = encoder.release_weights, encoder.restore_weights, encoder.encode

    def slow_release(mode: SleepMode) -> None:
        time.sleep(SLOW_S)
        release(mode)

    def slow_restore(mode: SleepMode) -> None:
        time.sleep(SLOW_S)
        restore(mode)

    def maybe_slow_encode(items: Sequence[Any]) -> Any:
        if slow_batches.is_set():
            time.sleep(SLOW_S)
        return encode(items)

    encoder.release_weights = slow_release  # type: ignore[method-assign]
    encoder.restore_weights = slow_restore  # type: ignore[method-assign]
    encoder.encode = maybe_slow_encode  # type: ignore[method-assign]


@contextmanager
def slow_service(model: Path, mode: str) -> Iterator[tuple[str, threading.Event]]:
    settings = Qwen3Settings(model=str(model), sleep_mode=mode)
    slow_batches = threading.Event()

    def load() -> Qwen3Service:
        encoder = Qwen3Encoder(str(model), CPU, torch.float32, settings.recipe())
        slow_encoder(encoder, slow_batches)
        return Qwen3Service(settings, encoder, "cpu")

    with serve_in_thread(build_text_app(settings, load=load)) as url:
        yield url, slow_batches


def health(url: str) -> dict[str, Any]:
    response = requests.get(url + "/health", timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_for_state(url: str, wanted: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while health(url)["state"] != wanted:
        assert time.monotonic() < deadline, f"still {health(url)['state']!r}, not {wanted!r}"
        time.sleep(0.02)


def embed(url: str, text: str = "a cat on the sea") -> np.ndarray:
    response = requests.post(url + "/embed/text", json={"text": text}, timeout=60)
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["embedding"])


def hang_up(url: str, path: str, body: dict[str, Any] | None = None, after_s: float = 0.2) -> None:
    """The client gives up after ``after_s`` and closes its connection, as a read timeout does."""
    with pytest.raises(requests.Timeout):
        requests.post(url + path, json=body, timeout=(5, after_s))


def during_a_batch(url: str, slow_batches: threading.Event) -> Callable[[], None]:
    """A batch is on the model when the sleep arrives: the sleep waits for it first."""
    slow_batches.set()
    thread = threading.Thread(target=embed, args=(url, "the batch the sleep waits for"))
    thread.start()
    time.sleep(0.1)

    def done() -> None:
        thread.join(30)
        slow_batches.clear()

    return done


@pytest.mark.parametrize("mode", ["unload", "offload"])
@pytest.mark.parametrize("hold", [False, True])
@pytest.mark.parametrize("point", ["waiting for the model's work", "releasing the weights", "waiting for a wake"])
def test_a_sleep_the_client_hangs_up_on_completes(tiny_zimage: Path, mode: str, hold: bool, point: str) -> None:
    with slow_service(tiny_zimage, mode) as (url, slow_batches):
        before = embed(url)
        cleanup = lambda: None  # noqa: E731
        if point == "waiting for the model's work":
            cleanup = during_a_batch(url, slow_batches)
        elif point == "waiting for a wake":
            assert requests.post(url + "/admin/sleep", timeout=30).json()["state"] == "asleep"
            waking = threading.Thread(target=requests.post, args=(url + "/admin/wake",), kwargs={"timeout": 30})
            waking.start()
            time.sleep(0.1)
            cleanup = lambda: waking.join(30)  # noqa: E731
        hang_up(url, "/admin/sleep", {"hold": hold})
        cleanup()
        wait_for_state(url, "held" if hold else "asleep")
        time.sleep(SLOW_S)  # anything still running on the model's worker has ended by now
        assert health(url)["state"] == ("held" if hold else "asleep")
        if hold:
            assert requests.post(url + "/embed/text", json={"text": "a"}, timeout=30).status_code == 503
            assert requests.post(url + "/admin/wake", timeout=30).json()["state"] == "awake"
        np.testing.assert_array_equal(embed(url), before)  # the next request wakes the model: 200, same vector
        assert health(url)["state"] == "awake"
        for _ in range(3):  # and it keeps serving (a broken model turns unhealthy after three failures)
            np.testing.assert_array_equal(embed(url), before)
        assert requests.get(url + "/health", timeout=10).json()["status"] == "ok"


def test_the_command_line_with_a_tiny_timeout_leaves_a_serving_service(tiny_zimage: Path) -> None:
    """``python -m embed_client sleep --timeout 0.06`` times out on the sleep it started; that sleep still completes,
    the command's retry finds the model held (a sleep is idempotent: exit 0), and after the wake the next request is
    served."""
    with slow_service(tiny_zimage, "unload") as (url, _):
        before = embed(url)
        command = [sys.executable, "-m", "embed_client", "sleep", "--url", url, "--hold", "--timeout", "0.06"]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and f"{url}: held" in result.stdout, result.stdout + result.stderr
        wait_for_state(url, "held")
        time.sleep(SLOW_S)
        assert health(url)["state"] == "held"
        wake = [sys.executable, "-m", "embed_client", "wake", "--url", url]
        assert subprocess.run(wake, cwd=ROOT, capture_output=True, text=True, timeout=120).returncode == 0
        np.testing.assert_array_equal(embed(url), before)
