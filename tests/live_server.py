"""Real servers for the tests that need sockets (connections, headers, disconnects, signals): the service's own
uvicorn server (``common.server.build_server``) run in a thread of the test process, or a service script run as a
process of its own; and raw HTTP/1.1 over a socket, for what no HTTP client library will send."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import requests
import torch
from fastapi import FastAPI

from common.config import ServiceSettings
from common.server import EmbedServer, build_server
from qwen3_embed import Qwen3Settings
from tests import helpers
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def text_app(
    model: Path, wrap_texts: Callable[[Any], Any] | None = None, **overrides: Any
) -> tuple[FastAPI, Qwen3Settings]:
    """The text service on the tiny model, on a free port, its encoder's batch method optionally wrapped."""
    app = helpers.text_app(model, wrap_texts=wrap_texts, **{"port": free_port(), **overrides})
    settings: Qwen3Settings = app.state.runtime.settings
    return app, settings


@contextmanager
def started_server(app: FastAPI, settings: ServiceSettings) -> Iterator[tuple[str, EmbedServer]]:
    """The app behind the service's uvicorn server, in a thread; yields its URL and the server once ``/health``
    answers 200 (``server.should_exit = True`` is what a stop signal does)."""
    server = build_server(app, settings)
    thread = threading.Thread(target=server.run, name="uvicorn-under-test", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert thread.is_alive(), "the server thread ended"
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or too busy loading to answer within 1 s
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.05)
        yield url, server
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "the server thread did not stop"


@contextmanager
def server_thread(app: FastAPI, settings: ServiceSettings) -> Iterator[str]:
    with started_server(app, settings) as (url, _):
        yield url


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def connect(url: str, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port_of(url)), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def send_quietly(sock: socket.socket, data: bytes) -> bool:
    """Send what the server still takes; False once it has closed the connection (it may answer early)."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed) from ``sock``: status, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside a response body"
        body += chunk
    return int(lines[0].split(" ")[1]), headers, body[:length]


def error_code(body: bytes) -> str:
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "code"} and error["message"], error
    return str(error["code"])


def request_bytes(
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    content_length: int | None = None,
) -> bytes:
    """A request as bytes; ``content_length`` declares more body than ``body`` holds (the rest is sent later)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def json_request(path: str, payload: Any, headers: dict[str, str] | None = None) -> bytes:
    return request_bytes("POST", path, orjson.dumps(payload), {"Content-Type": "application/json", **(headers or {})})


@contextmanager
def service_process(
    script: str, model: Path, log: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``script`` (siglip2_embed.py or qwen3_embed.py) as a real process on the tiny model, logging to ``log``;
    yields the process and its URL once it is ready, and ends it (by its PID) if the test did not."""
    port = free_port()
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    for name in ("EMBED_API_KEY", "EMBED_LOG_FILE", "SIGLIP2_LOG_FILE", "QWEN3_LOG_FILE", "EMBED_HOST"):
        environment.pop(name, None)  # a plain local server, logging to stdout
    command = [sys.executable, script, "--model", str(model), "--port", str(port), "--device", "cpu", *args]
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or too busy loading to answer within 1 s
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
