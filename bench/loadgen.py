"""Load generation and server processes shared by the benchmarks."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiohttp
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Server:
    url: str
    pid: int


@contextmanager
def server_process(
    args: list[str], port: int, log: Path, timeout: float = 600, health_path: str = "/health"
) -> Iterator[str]:
    """Start ``python ARGS`` (a server on ``port``), wait for ``health_path`` 200, yield its URL, stop it by PID."""
    with started_server(args, port, log, timeout, health_path) as server:
        yield server.url


@contextmanager
def started_server(
    args: list[str], port: int, log: Path, timeout: float = 600, health_path: str = "/health", cwd: Path = ROOT
) -> Iterator[Server]:
    """``server_process``, yielding the URL and the process id; ``cwd``: the checkout whose code it runs."""
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as log_file:
        process = subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited early; see {log}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + health_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout} s; see {log}")
            time.sleep(0.2)
        yield Server(url, process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def _cpu_seconds(stat: Path) -> float:
    text = stat.read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the fields after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def process_cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU seconds so far of process ``pid`` (all its threads, ``/proc/PID/stat``) and of its main
    thread alone (``/proc/PID/task/PID/stat``: an asyncio server's event loop)."""
    return _cpu_seconds(Path(f"/proc/{pid}/stat")), _cpu_seconds(Path(f"/proc/{pid}/task/{pid}/stat"))


@dataclass
class LoadResult:
    name: str
    items: int
    seconds: float
    latencies: list[float]
    errors: int
    client_cpu: float  # cores the load generator itself used

    @property
    def rate(self) -> float:
        return self.items / self.seconds

    def line(self, unit: str) -> str:
        p50, p95, p99 = (np.percentile(self.latencies, q) * 1000 for q in (50, 95, 99))
        return (
            f"{self.name:<28} {self.rate:9.1f} {unit}/s   p50 {p50:7.1f} ms   p95 {p95:7.1f} ms   "
            f"p99 {p99:7.1f} ms   errors {self.errors}   (load generator {self.client_cpu:.2f} cores)"
        )


# (session, request index) -> HTTP status. aiohttp, not httpx: the load generator shares the machine with the
# server, and httpx's async client spent ~3 ms of CPU per request (0.8 of a core at 250 requests/s).
Request = Callable[[aiohttp.ClientSession, int], Awaitable[int]]


async def _run_load(
    name: str, make_request: Request, clients: int, requests: int, items_per_request: int
) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def worker() -> None:
            nonlocal errors
            for index in counter:
                started = time.perf_counter()
                status = await make_request(session, index)
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    errors += 1

        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(clients)))
        seconds = time.perf_counter() - started
        client_cpu = (time.process_time() - cpu_started) / seconds
    return LoadResult(name, requests * items_per_request, seconds, latencies, errors, client_cpu)


def run_load(name: str, make_request: Request, clients: int, requests: int, items_per_request: int = 1) -> LoadResult:
    """``clients`` concurrent connections send ``requests`` requests in total; a short warm-up is not counted."""
    asyncio.run(_run_load(name + " warm-up", make_request, clients, min(requests, clients * 2), items_per_request))
    return run_load_once(name, make_request, clients, requests, items_per_request)


def run_load_once(
    name: str, make_request: Request, clients: int, requests: int, items_per_request: int = 1
) -> LoadResult:
    """``run_load`` without the warm-up (for a server that is warm already)."""
    return asyncio.run(_run_load(name, make_request, clients, requests, items_per_request))


async def post_json(session: aiohttp.ClientSession, url: str, body: object) -> int:
    async with session.post(url, json=body) as response:
        await response.read()
        return response.status


async def post_file(session: aiohttp.ClientSession, url: str, field: str, name: str, data: bytes) -> int:
    form = aiohttp.FormData()
    form.add_field(field, data, filename=name, content_type="image/jpeg")
    async with session.post(url, data=form) as response:
        await response.read()
        return response.status


def compare_with_baseline(
    kind: str,
    service_script: str,
    model_path: Path,
    device: str,
    make_request: Callable[..., Awaitable[int]],
    clients: int,
    requests: int,
    label: str,
    unit: str,
) -> list[str]:
    """Run the naive server, then ours, under the same load; lines with both figures and the ratio.

    ``make_request(session, index, url=...)`` sends one request and returns its status.
    """
    servers = {
        "naive baseline": ["-m", "bench.naive_servers", kind, "--model", str(model_path), "--device", device],
        service_script: [service_script, "--model", str(model_path), "--device", device, "--log-level", "warning"],
    }
    results = []
    for name, command in servers.items():
        port = free_port()
        log = ROOT / "bench" / "out" / f"{name.split()[0]}-{kind}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with server_process([*command, "--port", str(port)], port, log) as url:
            results.append(run_load(f"{label}: {name}", partial(make_request, url=url), clients, requests))
    lines = [result.line(unit) for result in results]
    lines.append(f"{label}: ratio {results[1].rate / results[0].rate:.2f}x the naive baseline's {unit}/s")
    return lines
