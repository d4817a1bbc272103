"""Connections held open without a word cannot lock other clients out: past ``max_connections`` a new connection
sheds one that holds no request (one that never sent a byte, oldest first; then an idle keep-alive; then one still
sending its headers), and only when every connection has a request in progress does the new one get 503. (The
front door runs the same protocol: tests/test_cluster_serve.py holds it to the same.)"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from common.http_protocol import LimitedHttpToolsProtocol
from common.server import EmbedServer
from tests.live_server import (
    connect,
    error_code,
    read_response,
    request_bytes,
    server_thread,
    started_server,
    text_app,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def served_within(url: str, seconds: float) -> float:
    """A normal client's request: its answer is 200, and comes within ``seconds``; returns how long it took."""
    started = time.monotonic()
    response = requests.post(url + "/embed/text", json={"text": "a cat"}, timeout=seconds)
    took = time.monotonic() - started
    assert response.status_code == 200 and took < seconds, (response.status_code, took)
    return took


def test_a_thousand_silent_connections_lock_no_client_out(tiny_zimage: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One local process holds 1000 connections that never send a byte, and opens them again as they are closed:
    a normal client is still served within 2 s, every time; the shedding is logged, but not once per connection."""
    app, settings = text_app(tiny_zimage, max_connections=300, header_timeout_s=10.0)
    with caplog.at_level(logging.WARNING), server_thread(app, settings) as url:
        silent = [connect(url, timeout=30) for _ in range(1000)]
        try:
            time.sleep(0.5)  # the server has taken them all in
            for _ in range(5):
                served_within(url, 2.0)
                silent += [connect(url, timeout=30) for _ in range(100)]  # the attacker reopens what was shed
        finally:
            for sock in silent:
                sock.close()
    shed = [r.getMessage() for r in caplog.records if "closed one that held no request" in r.getMessage()]
    assert 1 <= len(shed) <= 3 and "had not sent a byte" in shed[0], shed


def closed_by_the_server(sock: socket.socket, within_s: float = 0.5) -> bool:
    """Whether the server has closed ``sock`` (without a word) within ``within_s``."""
    readable, _, _ = select.select([sock], [], [], within_s)
    return bool(readable) and sock.recv(100) == b""


def trickle(url: str) -> socket.socket:
    """A connection that has sent part of its request headers."""
    sock = connect(url, timeout=30)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
    time.sleep(0.05)
    return sock


def served_on(url: str) -> socket.socket:
    """A new connection with one request answered 200 on it, kept open: an idle keep-alive from then on."""
    sock = connect(url, timeout=30)
    sock.sendall(request_bytes("GET", "/health"))
    assert read_response(sock)[0] == 200
    return sock


BUSY = 3  # in server_sees: a connection with a request in progress


def server_sees(server: EmbedServer, states: list[int], within_s: float = 10.0) -> None:
    """Wait until the server's open connections are in these states, in any order: their shedding ranks (0 never
    sent a byte, 1 idle, 2 still sending headers) or ``BUSY``. A client's bytes and closes reach the server's event
    loop some time later, under load later than any sleep: a newcomer accepted before a trickle's bytes were read
    would rightly shed the trickle, which at that moment had not sent a byte."""
    deadline = time.monotonic() + within_s
    while True:
        seen = sorted(
            BUSY if (rank := connection._shedding_rank()) is None else rank
            for connection in list(server.server_state.connections)
            if isinstance(connection, LimitedHttpToolsProtocol)
            and not connection.transport.is_closing()
            and not connection._refused
        )
        if seen == sorted(states):
            return
        assert time.monotonic() < deadline, f"the server sees {seen}, not {sorted(states)}"
        time.sleep(0.01)


def test_the_silent_then_the_idle_then_the_trickling_are_shed(tiny_zimage: Path) -> None:
    """At the cap, each new connection sheds one that holds no request: first those that never sent a byte (even
    the newest), then idle keep-alives (the one idle longest first), then those still sending their headers."""
    app, settings = text_app(tiny_zimage, max_connections=6, header_timeout_s=20.0)
    with started_server(app, settings) as (url, server):
        rank: dict[socket.socket, int] = {}
        for kind, opened in ((2, trickle), (1, served_on), (0, lambda url: connect(url, timeout=30))):
            for _ in range(2):
                sock = opened(url)
                rank[sock] = kind
                server_sees(server, list(rank.values()))
        order = sorted(rank, key=lambda sock: rank[sock])  # the order in which they must go: oldest first
        fillers = []
        for victim in order:
            served_on(url).close()  # a newcomer at the cap is served
            del rank[victim]
            server_sees(server, list(rank.values()))  # the victim shed, the newcomer's close taken in
            assert closed_by_the_server(victim, within_s=5)
            later = order[order.index(victim) + 1 :]
            assert not any(closed_by_the_server(sock, within_s=0) for sock in later)
            filler = trickle(url)  # back at the cap, with one that is newer than every one left
            fillers.append(filler)
            rank[filler] = 2
            server_sees(server, list(rank.values()))
        for sock in order + fillers:
            sock.close()


def test_connections_that_came_within_one_tick_are_shed_oldest_first(tiny_zimage: Path) -> None:
    """Eight silent connections opened back to back reach the server within one event-loop tick (uvloop's clock
    has millisecond steps and stands still within a tick): newcomers still shed them in the order they came, before
    any that came later."""
    app, settings = text_app(tiny_zimage, max_connections=8, header_timeout_s=20.0)
    with started_server(app, settings) as (url, server):
        silent = [connect(url, timeout=30) for _ in range(8)]
        server_sees(server, [0] * 8)
        fillers: list[socket.socket] = []
        for index, victim in enumerate(silent):
            with connect(url, timeout=30) as newcomer:
                newcomer.sendall(request_bytes("GET", "/health"))
                assert read_response(newcomer)[0] == 200
            server_sees(server, [0] * 7)  # the victim shed, the newcomer's close taken in
            assert closed_by_the_server(victim, within_s=5), f"connection {index} was not the one shed"
            assert not any(closed_by_the_server(sock, within_s=0) for sock in silent[index + 1 :] + fillers)
            fillers.append(connect(url, timeout=30))  # back at the cap, with one newer than every one left
            server_sees(server, [0] * 8)
        for sock in silent + fillers:
            sock.close()


def test_a_connection_with_a_request_in_progress_is_never_shed(
    tiny_zimage: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """When every connection has a request on the model, a new connection gets 503 at once (logged once), and every
    request in progress is answered."""
    release = threading.Event()

    def blocked(encode):
        def run(items):
            assert release.wait(30)
            return encode(items)

        return run

    app, settings = text_app(tiny_zimage, wrap_texts=blocked, max_connections=4, max_batch_size=1)
    with caplog.at_level(logging.WARNING), started_server(app, settings) as (url, server):
        busy = [connect(url, timeout=30) for _ in range(4)]
        for index, sock in enumerate(busy):
            sock.sendall(
                request_bytes("POST", "/embed/text", b'{"text": "t%d"}' % index, {"Content-Type": "application/json"})
            )
        server_sees(server, [BUSY] * 4)
        for _ in range(5):
            with connect(url) as refused:
                status, headers, body = read_response(refused)
                assert (status, error_code(body), headers["retry-after"]) == (503, "too_many_connections", "1")
        release.set()
        assert [read_response(sock)[0] for sock in busy] == [200] * 4
        for sock in busy:
            sock.close()
    refusals = [r.getMessage() for r in caplog.records if "refusing new ones" in r.getMessage()]
    assert len(refusals) == 1, refusals
