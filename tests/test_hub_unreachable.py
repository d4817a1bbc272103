"""A hub id on a machine without network: both services stop at the first connection that cannot be made, with a
message that says the hub could not be reached and how to download the model; a hub that answers 503 is retried.

No test here touches the real network: the hub is ``HF_ENDPOINT``, pointed at a closed local port (a refused
connection), at a name under ``.invalid`` (which never resolves), or at a small local server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx2
import pytest
from huggingface_hub.utils._http import default_client_factory

from common.hub import fail_fast_client, unreachable_reason
from tests.helpers import REPO, free_port

SERVICES = [("siglip2_embed", "google/siglip2-so400m-patch16-512"), ("qwen3_embed", "Tongyi-MAI/Z-Image-Turbo")]

# The service's main as `python SERVICE.py --model ID` runs it, timed without the imports (seconds of torch and
# transformers on a busy machine, not what is measured here).
TIMED_MAIN = """
import importlib, sys, time
service = importlib.import_module(sys.argv[1])
started = time.monotonic()
code = service.main(sys.argv[2:])
print(f"main took {time.monotonic() - started:.2f} s", file=sys.stderr)
sys.exit(code)
"""


def run_main(module: str, model: str, endpoint: str, hf_home: Path) -> tuple[int, str, float]:
    """Exit code, stderr and main's own duration of the service with an empty Hugging Face cache and the hub at
    ``endpoint``, with no proxy (whatever this machine's environment has)."""
    env = {name: value for name, value in os.environ.items() if not name.lower().endswith("_proxy")}
    env |= {"HF_HOME": str(hf_home), "HF_ENDPOINT": endpoint}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run(
        [sys.executable, "-c", TIMED_MAIN, module, "--model", model],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    took = [line for line in result.stderr.splitlines() if line.startswith("main took ")]
    assert took, result.stderr
    return result.returncode, result.stderr, float(took[-1].split()[2])


@pytest.mark.slow
@pytest.mark.parametrize(("module", "model"), SERVICES)
@pytest.mark.parametrize(
    ("endpoint", "why"),
    [("http://127.0.0.1:{port}", "the connection was refused"), ("http://hub.invalid", "does not resolve")],
)
def test_no_network_stops_at_once_saying_the_hub_could_not_be_reached(
    module: str, model: str, endpoint: str, why: str, tmp_path: Path
) -> None:
    hub = endpoint.format(port=free_port())
    code, err, took = run_main(module, model, hub, tmp_path / "hf")
    assert code == 1, err
    assert "could not be reached" in err and "no network" in err and why in err and hub in err, err
    assert "Download it on a machine with network access" in err and f"hf download {model}" in err
    assert "Retrying in" not in err and "Traceback" not in err, err  # not one retry of huggingface_hub's backoff
    # Measured under a second here; five retries 1 to 8 s apart took 24 s.
    assert took < 15, err


class FlakyHub(BaseHTTPRequestHandler):
    """Answers the listing of a repository's files with 503 ``failures`` times, then with the hub's 404 for a
    repository that does not exist; any other request (huggingface_hub asks for a registry of its own) with 404."""

    failures = 2
    listings: list[str]

    def do_GET(self) -> None:
        if "/tree/" in self.path:
            self.listings.append(self.path)
            unavailable = len(self.listings) <= self.failures
            self.send_response(503 if unavailable else 404)
            if not unavailable:
                self.send_header("X-Error-Code", "RepoNotFound")  # how the hub says that a repository does not exist
        else:
            self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # quiet: the output that counts is the service's
        pass


@pytest.fixture
def flaky_hub() -> Iterator[tuple[str, list[str]]]:
    listings: list[str] = []
    handler = type("Handler", (FlakyHub,), {"listings": listings})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", listings
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.slow
def test_a_hub_that_answers_503_is_still_retried(flaky_hub: tuple[str, list[str]], tmp_path: Path) -> None:
    """The text service lists the repository's files through huggingface_hub's backoff: a 5xx answer can pass,
    so it is retried (1 s, then 2 s), and the answer after it decides."""
    hub, listings = flaky_hub
    code, err, _ = run_main("qwen3_embed", "Tongyi-MAI/Z-Image-Turbo", hub, tmp_path / "hf")
    assert code == 1, err
    assert len(listings) == 3, listings  # two 503s, then the 404
    assert "Retrying in" in err and "RepositoryNotFoundError" in err and "could not be reached" not in err, err


# -- what counts as "cannot be reached" ----------------------------------------------------------------------------


def connect_error(url: str) -> httpx2.ConnectError:
    with pytest.raises(httpx2.ConnectError) as caught, httpx2.Client(trust_env=False) as client:
        client.get(url)
    return caught.value


def test_dns_failures_and_refused_connections_mean_unreachable() -> None:
    assert unreachable_reason(connect_error(f"http://127.0.0.1:{free_port()}/")) == "the connection was refused"
    assert unreachable_reason(connect_error("http://hub.invalid/")) == "the host name does not resolve"
    assert unreachable_reason(ConnectionResetError()) is None  # a dropped connection can be retried


def test_a_timeout_is_not_unreachable() -> None:
    """A server that does not answer in time may answer the next request: huggingface_hub retries it."""
    with socket.socket() as silent:  # listens (the kernel completes connections) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        client = httpx2.Client(trust_env=False)
        with client, pytest.raises(httpx2.TimeoutException) as caught:
            client.get(f"http://127.0.0.1:{silent.getsockname()[1]}/", timeout=0.2)
    assert unreachable_reason(caught.value) is None


def test_the_fail_fast_client_is_the_hubs_own_client_otherwise() -> None:
    """The same request hook (it blocks requests under HF_HUB_OFFLINE), redirects and timeouts as
    huggingface_hub's default client: only what a failed connection raises differs."""
    ours, theirs = fail_fast_client(), default_client_factory()
    with ours, theirs:
        assert ours.event_hooks == theirs.event_hooks
        assert ours.follow_redirects == theirs.follow_redirects and ours.timeout == theirs.timeout
        assert ours.trust_env == theirs.trust_env
