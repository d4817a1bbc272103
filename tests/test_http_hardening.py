"""Hostile HTTP, round two: nothing a client sends or holds makes the service work before it may, or for longer
than it must. Authentication and origin checks come before the body is read; a body or headers that never end are
cut off; oversized lists are refused before validation; headers, connections and header time are bounded; only
expected Host names are answered; 500s are counted and logged once; URLs cannot forge log lines; HEAD works."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Message

import common.api.json_body
import common.api.middleware
import common.server
from common.api.json_body import PARSE_IN_THREAD_BYTES
from qwen3_embed import Qwen3Settings
from qwen3_embed import build_app as build_text_app
from siglip2_embed import Siglip2Settings
from siglip2_embed import build_app as build_image_app
from tests.helpers import assert_error, wait_ready
from tests.live_server import (
    connect,
    error_code,
    read_response,
    request_bytes,
    send_quietly,
    server_thread,
    text_app,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- who may make the service work: decided before the body is read ------------------------------------------------


def call_asgi(app: FastAPI, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], int]:
    """One request straight into the ASGI app, whose body never ends; returns status, headers and how often the
    app asked for the body."""
    reads = 0
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(name.lower().encode(), value.encode()) for name, value in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 6011),
        "state": {},
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    start = next(message for message in sent if message["type"] == "http.response.start")
    response_headers = {name.decode(): value.decode() for name, value in start["headers"]}
    return start["status"], response_headers, reads


HUGE_JSON = {"Content-Type": "application/json", "Content-Length": "254000000", "Host": "127.0.0.1:6011"}
HUGE_UPLOAD = {"Content-Type": "multipart/form-data; boundary=xyz", "Content-Length": "254000000", "Host": "localhost"}


@pytest.mark.parametrize(
    ("service", "path", "headers"),
    [
        ("text", "/embed/texts", HUGE_JSON),
        ("text", "/v1/embeddings", HUGE_JSON),
        ("image", "/embed/image", HUGE_UPLOAD),
        ("image", "/embed/images", HUGE_UPLOAD),
        ("image", "/similarity", HUGE_UPLOAD),
    ],
)
def test_an_unauthenticated_body_is_never_read(
    tiny_siglip: Path, tiny_zimage: Path, service: str, path: str, headers: dict[str, str]
) -> None:
    """With an API key set, a request without it is answered 401 from its headers: not one read of its body (a
    254 MB JSON body was read and parsed before the 401, a multipart upload spooled to disk)."""
    if service == "text":
        app = build_text_app(Qwen3Settings(model=str(tiny_zimage), api_key="k"))
    else:
        app = build_image_app(Siglip2Settings(model=str(tiny_siglip), api_key="k"))
    status, response_headers, reads = call_asgi(app, "POST", path, headers)
    assert (status, reads) == (401, 0)
    assert response_headers["connection"] == "close"  # the rest of the body is not wanted
    assert response_headers["www-authenticate"] == "Bearer"


def test_a_cross_origin_upload_is_never_read(tiny_siglip: Path) -> None:
    """A page on another site can post a multipart form without a CORS preflight: refused from its headers."""
    app = build_image_app(Siglip2Settings(model=str(tiny_siglip)))
    status, _, reads = call_asgi(app, "POST", "/embed/image", {**HUGE_UPLOAD, "Origin": "http://evil.example"})
    assert (status, reads) == (403, 0)


def test_the_401_arrives_while_a_huge_upload_is_still_being_sent(tiny_zimage: Path) -> None:
    app, settings = text_app(tiny_zimage, api_key="k")
    with server_thread(app, settings) as url:
        for path, content_type in (("/embed/texts", "application/json"), ("/embed/text", "multipart/form-data")):
            with connect(url) as sock:
                start = b'{"texts": ["' + b"a" * 65536
                headers = {"Content-Type": content_type}
                send_quietly(sock, request_bytes("POST", path, start, headers, content_length=254_000_000))
                status, headers, body = read_response(sock)  # long before 254 MB were sent
                assert (status, error_code(body), headers["connection"]) == (401, "invalid_api_key", "close")
        assert requests.get(f"{url}/health", timeout=5).status_code == 200


def test_a_body_that_trickles_in_gets_408(tiny_zimage: Path) -> None:
    app, settings = text_app(tiny_zimage, body_timeout_s=1.0)
    with server_thread(app, settings) as url, connect(url, timeout=15) as sock:
        headers = {"Content-Type": "application/json"}
        sock.sendall(request_bytes("POST", "/embed/texts", b'{"texts": ["', headers, content_length=1000))
        sock.settimeout(0.2)
        deadline = time.monotonic() + 12  # about 60 bytes in that time: never the whole body
        response = b""
        while time.monotonic() < deadline and not response:
            if not send_quietly(sock, b" "):
                break
            try:
                response = sock.recv(65536, socket.MSG_PEEK)
            except TimeoutError:
                continue
        sock.settimeout(5)
        status, headers, body = read_response(sock)
        assert (status, error_code(body), headers["connection"]) == (408, "body_timeout", "close")
        assert requests.get(f"{url}/health", timeout=5).status_code == 200


# --- oversized lists: refused before validation -----------------------------------------------------------------


MILLION = [1] * 1_000_000


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/embed/texts", {"texts": MILLION}),
        ("/embed/text", {"texts": MILLION}),
        ("/v1/embeddings", {"input": MILLION}),
        ("/embed/texts", {"texts": ["a"] * 257}),
    ],
)
def test_a_long_list_is_413_before_validation(text_client: TestClient, path: str, payload: dict[str, Any]) -> None:
    """A million numbers (2 MB) took 7 s and 1 GB building a million validation errors, to report five."""
    started = time.perf_counter()
    error = assert_error(text_client.post(path, json=payload), 413, "too_many_items")
    assert "max_items_per_request=256" in error["message"]
    assert time.perf_counter() - started < 5  # measured: 0.1 s here; it was 7 s


def test_long_lists_on_the_image_routes_are_413(image_client: TestClient) -> None:
    assert_error(image_client.post("/embed/images", json={"images_base64": MILLION}), 413, "too_many_items")
    form = {"texts": json.dumps(MILLION)}
    files = [("files", ("a.png", b"not read"))]
    assert_error(image_client.post("/similarity", data=form, files=files), 413, "too_many_items")


def test_large_json_bodies_are_parsed_off_the_event_loop(
    text_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []

    def loads(raw: bytes | str) -> Any:
        threads.append(threading.current_thread().name)
        return json.loads(raw)

    monkeypatch.setattr(common.api.json_body, "json", SimpleNamespace(loads=loads))
    big_text = "a" * (PARSE_IN_THREAD_BYTES + 10)
    response = text_client.post("/embed/texts", json={"texts": [big_text]})
    assert_error(response, 413, "payload_too_large")  # past max_text_chars, but only after parsing
    assert text_client.post("/embed/texts", json={"texts": ["small"]}).status_code == 200
    worker, loop = threads
    assert worker.startswith("asyncio_") and not loop.startswith("asyncio_")


# --- headers, connections, time before a request is complete --------------------------------------------------------


def test_headers_past_the_bounds_get_431(tiny_zimage: Path) -> None:
    app, settings = text_app(tiny_zimage)
    with server_thread(app, settings) as url:
        fine = {f"X-Fine-{i}": "y" * 100 for i in range(50)}
        with connect(url) as sock:
            sock.sendall(request_bytes("GET", "/health", headers=fine))
            assert read_response(sock)[0] == 200
        hostile = [
            {f"X-{i}": "y" for i in range(10_000)},  # 10,000 headers
            {"X-Big": "y" * 1024 * 1024},  # one 1 MB header
            {f"X-{i}": "y" * 100_000 for i in range(100)},  # 10 MB of headers
        ]
        for headers in hostile:
            with connect(url) as sock:
                send_quietly(sock, request_bytes("GET", "/health", headers=headers))
                status, response_headers, body = read_response(sock)
                assert (status, error_code(body), response_headers["connection"]) == (431, "headers_too_large", "close")
        assert requests.get(f"{url}/health", timeout=5).status_code == 200


def test_slow_headers_and_idle_connections_are_closed(tiny_zimage: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Slowloris: connections that never finish their headers are closed after header_timeout_s (408), idle ones
    silently; each is logged, but not each time. (Past max_connections: tests/test_connection_shedding.py.)"""
    app, settings = text_app(tiny_zimage, max_connections=40, header_timeout_s=1.0)
    with caplog.at_level(logging.WARNING), server_thread(app, settings) as url:
        slow = [connect(url, timeout=15) for _ in range(19)]
        idle = connect(url, timeout=15)
        for sock in slow:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        time.sleep(0.2)
        started = time.monotonic()
        for sock in slow:
            send_quietly(sock, b"a")  # still trickling
            status, _, body = read_response(sock)
            assert (status, error_code(body)) == (408, "header_timeout")
            sock.close()
        assert idle.recv(100) == b""  # closed without a word
        idle.close()
        assert time.monotonic() - started < 10  # measured: 1 s; it was never
        assert requests.get(f"{url}/health", timeout=5).status_code == 200
    timeouts = [r.getMessage() for r in caplog.records if "had not sent its request headers" in r.getMessage()]
    assert 1 <= len(timeouts) <= 2, timeouts


def test_the_connection_limit_fits_the_file_limit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 1024))
    monkeypatch.setattr(resource, "setrlimit", lambda *_: pytest.fail("not above the hard limit"))
    assert common.server.connection_limit(100) == 100
    with caplog.at_level(logging.WARNING):
        assert common.server.connection_limit(5000) == 1024 - common.server.RESERVED_FDS
    assert "may open only 1024 files" in caplog.text
    raised: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 65536))
    monkeypatch.setattr(resource, "setrlimit", lambda _, limits: raised.append(limits))
    assert common.server.connection_limit(5000) == 5000 and raised == [(5000 + common.server.RESERVED_FDS, 65536)]


# --- browsers on other sites: Host and Origin ---------------------------------------------------------------------


ALLOWED_ORIGIN = "http://localhost:3000"


@pytest.fixture(scope="module")
def loopback_client(tiny_zimage: Path) -> Iterator[TestClient]:
    """A text service whose requests arrive on 127.0.0.1:6011 (the TestClient takes the server's address from the
    URL), with one browser origin allowed."""
    app = build_text_app(Qwen3Settings(model=str(tiny_zimage), cors_origins=[ALLOWED_ORIGIN]))
    with TestClient(app, base_url="http://127.0.0.1:6011") as client:
        wait_ready(client)
        yield client


def test_a_loopback_service_answers_only_loopback_host_names(loopback_client: TestClient) -> None:
    client = loopback_client
    for host in ("127.0.0.1:6011", "localhost:6011", "localhost", "[::1]:6011", "app.localhost:6011", "10.1.2.3"):
        assert client.get("/info", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example:6011", "evil.example", "127.0.0.1.evil.example", "localhost.evil.example"):
        # A DNS-rebinding page: its own name, now resolving to 127.0.0.1.
        for response in (
            client.get("/info", headers={"Host": host}),
            client.post("/embed/text", json={"text": "a"}, headers={"Host": host}),
        ):
            assert_error(response, 400, "invalid_host")


def test_the_host_check_answers_the_same_when_asked_again(loopback_client: TestClient) -> None:
    """The guard keeps what it learnt about an address (parsing one costs microseconds, on every request): each
    answer is the first one, an address longer than the cache keeps is still judged, and made-up names, however
    many, do not grow the cache past its bound."""
    client = loopback_client
    long_address = "[::1%" + "a" * 100 + "]"  # an IPv6 loopback address with a scope id, too long to be cached
    for _ in range(3):
        for host in ("127.0.0.1:6011", "[::1]:6011", long_address):
            assert client.get("/info", headers={"Host": host}).status_code == 200, host
        assert_error(client.get("/info", headers={"Host": "evil.example"}), 400, "invalid_host")
    for index in range(300):
        assert_error(client.get("/info", headers={"Host": f"10.0.{index}.1.evil.example"}), 400, "invalid_host")
    cache = common.api.middleware._parse_ip.cache_info()
    assert cache.maxsize is not None and cache.currsize <= cache.maxsize


def test_allowed_hosts_is_the_list_of_names(tiny_zimage: Path) -> None:
    app = build_text_app(Qwen3Settings(model=str(tiny_zimage), allowed_hosts=["embed.example.com", "*.internal"]))
    with TestClient(app, base_url="http://127.0.0.1:6011") as client:
        for host in ("embed.example.com", "embed.example.com:6011", "gpu.internal"):
            assert client.get("/health", headers={"Host": host}).status_code in (200, 503), host
        for host in ("localhost", "evil.example", "internal"):
            assert_error(client.get("/health", headers={"Host": host}), 400, "invalid_host")


def test_a_service_bound_elsewhere_answers_any_host_by_default(tiny_zimage: Path) -> None:
    app = build_text_app(Qwen3Settings(model=str(tiny_zimage)))
    with TestClient(app, base_url="http://10.0.0.5:6011") as client:
        assert client.get("/info", headers={"Host": "gpu-box.lan:6011"}).status_code == 200


def test_cross_site_posts_are_403(loopback_client: TestClient) -> None:
    client, allowed = loopback_client, ALLOWED_ORIGIN
    ok = {"text": "a"}
    refused: list[dict[str, str]] = [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},  # a sandboxed frame or a file: page
        {"Origin": "http://localhost:6011"},  # same site, other origin (host differs from the Host header)
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"},
    ]
    for headers in refused:
        assert_error(client.post("/embed/text", json=ok, headers=headers), 403, "cross_origin")
        assert_error(
            client.post("/embed/text", content=b"text=a", headers={**headers, "Content-Type": "text/plain"}),
            403,
            "cross_origin",
        )
    accepted: list[dict[str, str]] = [
        {},  # not a browser
        {"Origin": allowed},  # listed in cors_origins
        {"Origin": "http://127.0.0.1:6011"},  # the service's own page (/docs)
        {"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:6011"},
        {"Sec-Fetch-Site": "none"},  # typed by the user
    ]
    for headers in accepted:
        assert client.post("/embed/text", json=ok, headers=headers).status_code == 200, headers
    assert client.get("/info", headers={"Origin": "http://evil.example"}).status_code == 200  # unreadable anyway


# --- answers: HEAD, 500s, log lines ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/info", "/metrics"])
def test_head_is_answered_like_get(text_client: TestClient, path: str) -> None:
    head, get = text_client.head(path), text_client.get(path)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


def test_a_url_cannot_forge_or_colour_log_lines(text_client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="embed.access"):
        text_client.get("/x%0a2026-01-01 INFO embed.access: GET /admin 200%0d%1b[31mred%00nul")
        text_client.get("/" + "a" * 60_000)
    lines = [record.getMessage() for record in caplog.records if record.name == "embed.access"]
    forged, long = lines[-2:]
    assert "\n" not in forged and "\r" not in forged and "\x1b" not in forged and "\x00" not in forged
    assert "\\n2026-01-01" in forged and "\\x1b[31m" in forged and "\\x00" in forged
    assert len(long) < 1000


def failing(method: Any) -> Any:
    def run(items: Any) -> Any:
        if "boom" in items:
            raise RuntimeError("simulated failure")
        return method(items)

    return run


def errors_total(url: str, code: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "embed_errors_total" and sample.labels == {"route": "/embed/text", "code": code}:
                return float(sample.value)
    return 0.0


def test_a_500_is_counted_and_logged_once(tiny_zimage: Path, caplog: pytest.LogCaptureFixture) -> None:
    app, settings = text_app(tiny_zimage, wrap_texts=failing)
    with caplog.at_level(logging.INFO), server_thread(app, settings) as url:
        response = requests.post(f"{url}/embed/text", json={"text": "boom"}, timeout=10)
        assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
        request_id = response.headers["x-request-id"]
        assert errors_total(url, "internal_error") == 1
        assert requests.post(f"{url}/embed/text", json={"text": "fine"}, timeout=10).status_code == 200
    tracebacks = [record for record in caplog.records if record.exc_info]
    assert len(tracebacks) == 1 and request_id in tracebacks[0].getMessage(), [r.getMessage() for r in tracebacks]
    access = [r.getMessage() for r in caplog.records if r.name == "embed.access" and request_id in r.getMessage()]
    assert len(access) == 1 and " 500 " in access[0]
