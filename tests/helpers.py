"""Helpers shared by the test modules (the fixtures themselves live in conftest.py).

* images made in memory: ``photo_like``, ``image_bytes``, ``mixed_images``, and ``MIXED_TEXTS``;
* the services on the tiny models: ``image_app`` / ``text_app`` (the encoder's batch methods optionally wrapped,
  to make the model slow or failing), and ``serving`` / ``ready_client`` / ``wait_ready`` / ``wait_loaded`` to talk
  to them in-process;
* checks: ``assert_error`` (the error envelope), ``assert_same_vectors``;
* ``free_port``, ``serve_in_thread`` (a real uvicorn server) and ``Scripts`` (start_all.sh / stop_all.sh with a
  test's own ports and log directory) for tests that start real servers; ``process_tree`` and
  ``listening_sockets`` for what a process and its children run and listen on.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from common.services import SERVICES as REGISTRY
from qwen3_embed import Qwen3Encoder, Qwen3Service, Qwen3Settings
from qwen3_embed import build_app as build_text_app
from siglip2_embed import Siglip2Encoder, Siglip2Service, Siglip2Settings
from siglip2_embed import build_app as build_image_app

CPU = torch.device("cpu")
# A batch method of an encoder (images or texts in, one row per item out), and what wraps one in a test.
BatchMethod = Callable[[Sequence[Any]], np.ndarray]
Wrapper = Callable[[Any], Any]


# --- ports --------------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- images and texts made in memory --------------------------------------------------------------------------------


def image_bytes(image: Image.Image, fmt: str = "PNG", **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def photo_like(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Smooth gradients plus noise: compresses like a photo, and differs from image to image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [
        127 + 120 * np.sin(x / (width / (2 + seed % 3)) + phase) * np.cos(y / (height / 3) + phase)
        for phase in rng.uniform(0, 3, size=3)
    ]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 8, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").convert(mode)


def write_example_photos(folder: Path) -> Path:
    """The photos the documentation's examples name (cat.jpg, dog.jpg, dog.png, img1-3.jpg), of real size: a data
    URI of a 300 KB photo is longer than one command-line argument may be."""
    for index, name in enumerate(["cat.jpg", "dog.jpg", "img1.jpg", "img2.jpg", "img3.jpg"]):
        (folder / name).write_bytes(image_bytes(photo_like(1600, 1200, seed=index), "JPEG", quality=95))
    (folder / "dog.png").write_bytes(image_bytes(photo_like(640, 480, seed=9), "PNG"))
    return folder


@contextmanager
def public_folder(prefix: str) -> Iterator[Path]:
    """A temporary folder every user may enter (pytest's tmp_path lies in a folder of mode 0700), for a service that
    runs as another user (a container's, or one started through setpriv); removed afterwards with whatever a test
    locked inside it."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in [folder, *folder.rglob("*")]:
            if not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(folder)


def readable_copy(model: Path, into: Path) -> Path:
    """A copy of a model folder that any user may read (for a service run as another user, or in a container)."""
    copy = into / model.name
    shutil.copytree(model, copy)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return copy


def mixed_images() -> list[bytes]:
    """Eight encoded images of different formats and sizes, from 1 x 1 to 800 x 600."""
    sizes = [(1, 1), (16, 9), (64, 64), (97, 31), (200, 300), (640, 480), (800, 600), (33, 700)]
    formats: list[tuple[str, dict[str, Any]]] = [
        ("PNG", {}),
        ("JPEG", {"quality": 85}),
        ("WEBP", {}),
        ("BMP", {}),
        ("GIF", {}),
        ("TIFF", {}),
    ]
    images = []
    for index, (width, height) in enumerate(sizes):
        fmt, args = formats[index % len(formats)]
        photo = photo_like(width, height, seed=index + 10)
        images.append(image_bytes(photo if fmt != "GIF" else photo.convert("P"), fmt, **args))
    return images


# Ten texts of different scripts and lengths.
MIXED_TEXTS = [
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


# --- the services on the tiny models --------------------------------------------------------------------------------


def image_app(
    model: Path,
    *,
    wrap_images: Wrapper | None = None,
    wrap_texts: Wrapper | None = None,
    **overrides: Any,
) -> FastAPI:
    """The image service on a tiny model, on the CPU in float32, with ``Siglip2Settings`` ``overrides`` and its
    encoder's batch methods optionally wrapped (a model that is slow, or fails)."""
    settings = Siglip2Settings(model=str(model), **overrides)

    def load() -> Siglip2Service:
        encoder = Siglip2Encoder(str(model), CPU, torch.float32)
        encoder.embed_texts(["warm-up"])  # as the service's own load does, before any wrapper
        if wrap_images is not None:
            encoder.embed_images = wrap_images(encoder.embed_images)  # type: ignore[method-assign]
        if wrap_texts is not None:
            encoder.embed_texts = wrap_texts(encoder.embed_texts)  # type: ignore[method-assign]
        return Siglip2Service(settings, encoder, "cpu")

    return build_image_app(settings, load=load)


def text_app(model: Path, *, wrap_texts: Wrapper | None = None, **overrides: Any) -> FastAPI:
    """The text service on a tiny model, on the CPU in float32; see ``image_app``."""
    settings = Qwen3Settings(model=str(model), **overrides)

    def load() -> Qwen3Service:
        encoder = Qwen3Encoder(str(model), CPU, torch.float32, settings.recipe())
        encoder.embed_texts(["warm-up"])
        if wrap_texts is not None:  # the text batches' method (vectors and per-token states)
            encoder.encode = wrap_texts(encoder.encode)  # type: ignore[method-assign]
        return Qwen3Service(settings, encoder, "cpu")

    return build_text_app(settings, load=load)


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    """Poll /health until the model is loaded (200); it must say "loading" until then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/health")
        if response.status_code == 200:
            return
        assert response.json()["status"] == "loading", response.text
        time.sleep(0.02)
    raise AssertionError("service did not become ready")


def wait_loaded(client: TestClient, timeout: float = 60.0) -> Any:
    """Poll /health until loading has ended, well or badly; returns the first answer that is not "loading"."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get("/health")
        if response.json()["status"] != "loading":
            return response
        assert time.monotonic() < deadline, "the model is still loading"
        time.sleep(0.02)


def ready_client(app: FastAPI) -> Iterator[TestClient]:
    """For module fixtures (``yield from ready_client(app)``): a client of ``app`` once its model has loaded."""
    with TestClient(app) as client:
        wait_ready(client)
        yield client


@contextmanager
def serving(app: FastAPI) -> Iterator[TestClient]:
    """A client of ``app`` once its model has loaded, that sees what a real client sees: a server error is a 500
    response, not the server's exception re-raised in the test."""
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


# --- checks ---------------------------------------------------------------------------------------------------------


def assert_error(response: Any, status: int, code: str) -> dict[str, str]:
    """``response`` is an error of ``status`` in the services' envelope with ``code``; returns the error object."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert set(error) == {"message", "type", "code"} and error["message"]
    return error


def assert_same_vectors(got: Sequence[Sequence[float]], expected: Sequence[np.ndarray]) -> None:
    """Row by row, the same vectors (as a request alone got them), in the same order."""
    assert len(got) == len(expected)
    for vector, reference in zip(got, expected, strict=True):
        np.testing.assert_allclose(vector, reference, atol=2e-5)
        assert float(np.dot(vector, reference)) >= 0.9999


@contextmanager
def serve_in_thread(app: FastAPI, wait_ready: bool = True) -> Iterator[str]:
    """A real uvicorn server on a free port (the client's connections, retries and bodies are real HTTP)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started or (wait_ready and requests.get(url + "/health", timeout=5).status_code != 200):
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def assert_same_array(got: np.ndarray, expected: np.ndarray) -> None:
    """Two float32 matrices of vectors, row by row the same direction (cosine >= 0.9999)."""
    assert got.shape == expected.shape and got.dtype == np.float32
    cosine = np.sum(got * expected, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() >= 0.9999, cosine


# --- the shell scripts ----------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
SERVICES = tuple(REGISTRY)


def cmdline(pid: int) -> str:
    """The command line of a live process; "" for one that is gone or a zombie."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass(frozen=True)
class Process:
    pid: int
    started: int  # clock ticks after boot: with the pid, one process (a pid may be reused)
    name: str  # the command line, or the title a Ray worker gives itself ("ray::ServeReplica:siglip2:siglip2")

    @property
    def alive(self) -> bool:
        here = process(self.pid)
        return here is not None and here.started == self.started


def process(pid: int) -> Process | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] == "Z":
        return None
    return Process(pid, int(fields[19]), cmdline(pid).strip())


def process_tree(root: int) -> list[Process]:
    """``root`` and every process below it (Ray's processes are children of the driver or of ``ray start``, its
    workers children of the raylet)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    pids, frontier = [root], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        pids += children
        frontier += children
    return [found for pid in pids if (found := process(pid)) is not None]


def outliving(processes: Sequence[Process], seconds: float = 30) -> list[Process]:
    """Those of ``processes`` still alive after ``seconds``, killed (SIGKILL, each by its own PID)."""
    deadline = time.monotonic() + seconds
    while any(p.alive for p in processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [p for p in processes if p.alive]
    for leftover in left:
        os.kill(leftover.pid, signal.SIGKILL)
    return left


def listening_sockets(processes: Sequence[Process]) -> list[tuple[Process, str, int]]:
    """(process, address, port) of every listening TCP socket the processes hold (from /proc/net/tcp{,6} and
    their file descriptors); an IPv4 address mapped into IPv6 (``::ffff:127.0.0.1``) is given as the IPv4 one."""
    listening: dict[int, tuple[str, int]] = {}
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            raw_address, raw_port = fields[1].split(":")
            packed = bytes.fromhex(raw_address)
            words = b"".join(packed[i : i + 4][::-1] for i in range(0, len(packed), 4))  # host-order words
            address = socket.inet_ntop(family, words)
            listening[int(fields[9])] = (address.removeprefix("::ffff:"), int(raw_port, 16))
    found = []
    for holder in processes:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{holder.pid}/fd").iterdir()]
        except OSError:
            continue  # gone meanwhile
        for link in links:
            if link.startswith("socket:[") and int(link[8:-1]) in listening:
                found.append((holder, *listening[int(link[8:-1])]))
    return sorted(set(found), key=lambda row: (row[0].pid, row[2]))


def service_pids(script: str, port: int) -> list[int]:
    """Every live process running ``script`` on ``port``: duplicates would show up here."""
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return [pid for pid in pids if script in (line := cmdline(pid)) and f"--port {port}" in line]


class Scripts:
    """Runs the repository's scripts with this test's ports, log directory and virtualenv."""

    def __init__(self, log_dir: Path, ports: dict[str, int]) -> None:
        self.log_dir = log_dir
        self.ports = ports
        self.env = {
            **os.environ,
            "EMBED_LOG_DIR": str(log_dir),
            "SIGLIP2_PORT": str(ports["siglip2"]),
            "QWEN3_PORT": str(ports["qwen3"]),
            "START_TIMEOUT": "120",
        }
        if sys.prefix != sys.base_prefix:
            self.env["VENV"] = sys.prefix  # the virtualenv running this test

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(REPO / args[0]), *args[1:]],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )

    def pid(self, service: str) -> int:
        return int((self.log_dir / f"{service}.pid").read_text())

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"
