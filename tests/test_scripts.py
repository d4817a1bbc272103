"""start_all.sh / stop_all.sh end to end on the tiny models: real processes, real ports, real PID files.

Every run uses its own free ports and log directory, so it never touches services a developer has running.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from common.server import RotatingLogFile
from tests.helpers import SERVICES, Scripts, cmdline, image_bytes, photo_like, service_pids

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="inspects processes through /proc"),
]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def stranger() -> Iterator[int]:
    """An unrelated live process whose PID lands in a PID file: it must survive."""
    process = subprocess.Popen(["sleep", "300"])
    yield process.pid
    assert process.poll() is None, "the scripts killed a process that was not theirs"
    process.kill()
    process.wait()


def wait_for_line(log: Path, text: str, timeout: float = 10.0) -> None:
    """The access line is written just after the response has gone out: give it a moment."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"{text!r} not in {log}"
        time.sleep(0.05)


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def write_stale_pid_files(scripts: Scripts, stranger: int) -> None:
    scripts.log_dir.mkdir(parents=True, exist_ok=True)
    (scripts.log_dir / "siglip2.pid").write_text(f"{dead_pid()}\n")
    (scripts.log_dir / "qwen3.pid").write_text(f"{stranger}\n")


def test_start_use_stop(scripts: Scripts, stranger: int) -> None:
    # Stale PID files (a dead PID, a live stranger) neither block the start nor get anybody killed.
    write_stale_pid_files(scripts, stranger)
    started = scripts.run("start_all.sh", "--tiny")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "MEANINGLESS" in started.stdout
    for service in SERVICES:
        assert f"{service}: ready at {scripts.url(service)}" in started.stdout
    pids = {service: scripts.pid(service) for service in SERVICES}
    assert stranger not in pids.values()

    with httpx.Client(trust_env=False, timeout=30) as client:
        for service in SERVICES:
            health = client.get(f"{scripts.url(service)}/health")
            assert health.status_code == 200
            assert health.json()["status"] == "ok"
        jpeg = image_bytes(photo_like(96, 64), "JPEG")
        image = client.post(f"{scripts.url('siglip2')}/embed/image", files={"file": ("a.jpg", jpeg, "image/jpeg")})
        assert image.status_code == 200, image.text
        assert len(image.json()["embedding"]) == image.json()["dimension"]
        text = client.post(f"{scripts.url('qwen3')}/embed/text", json={"text": "a cat on the sea"})
        assert text.status_code == 200, text.text
        assert len(text.json()["embedding"]) == text.json()["dimension"]

    # The services log to the rotated files start_all.sh names: one line per request.
    wait_for_line(scripts.log_dir / "siglip2.log", "POST /embed/image 200")
    wait_for_line(scripts.log_dir / "qwen3.log", "POST /embed/text 200")

    # A second start finds them running and starts nothing.
    again = scripts.run("start_all.sh", "--tiny")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already running") == 2
    for service in SERVICES:
        assert scripts.pid(service) == pids[service]
        assert service_pids(f"{service}_embed.py", scripts.ports[service]) == [pids[service]]

    stopped = scripts.run("stop_all.sh")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    for service in SERVICES:
        assert cmdline(pids[service]) == ""
        assert port_is_free(scripts.ports[service])
        assert not (scripts.log_dir / f"{service}.pid").exists()
        # uvicorn shut down cleanly on SIGTERM, not killed
        assert "Finished server process" in (scripts.log_dir / f"{service}.log").read_text()

    stopped_again = scripts.run("stop_all.sh")
    assert stopped_again.returncode == 0, stopped_again.stdout + stopped_again.stderr
    assert stopped_again.stdout.count("not running") == 2

    # stop_all.sh with stale PID files removes them and signals nobody.
    write_stale_pid_files(scripts, stranger)
    stale = scripts.run("stop_all.sh")
    assert stale.returncode == 0, stale.stdout + stale.stderr
    assert stale.stdout.count("stale PID file") == 2
    assert not list(scripts.log_dir.glob("*.pid"))


def test_missing_model_fails_fast_with_download_help(scripts: Scripts, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    begin = time.monotonic()
    result = scripts.run("start_all.sh", "siglip2", env={"SIGLIP2_MODEL": str(missing)})
    assert result.returncode != 0
    # It notices that the process died instead of polling /health until START_TIMEOUT.
    assert "siglip2: FAILED: the process exited" in result.stderr
    assert time.monotonic() - begin < int(scripts.env["START_TIMEOUT"])
    assert str(missing) in result.stderr  # the tail of the log names the path tried ...
    assert "hf download" in result.stderr  # ... and how to download the model
    assert "Traceback" not in result.stderr
    assert not (scripts.log_dir / "siglip2.pid").exists()


def test_log_file_is_rotated_with_a_size_cap(tmp_path: Path) -> None:
    # In a child process: configure_logging replaces the root handlers, which would disturb pytest's own.
    log_file = tmp_path / "logs" / "svc.log"
    program = (
        "import logging, common.server as logs\n"
        "logs.LOG_FILE_BYTES = 2000\n"
        f"logs.configure_logging('info', {str(log_file)!r})\n"
        "for i in range(500): logging.getLogger('test').info('request %d %s', i, 'x' * 50)\n"
    )
    subprocess.run([sys.executable, "-c", program], cwd=ROOT, check=True, timeout=120)
    files = sorted(path.name for path in log_file.parent.iterdir())
    assert files == ["svc.log", *(f"svc.log.{n}" for n in range(1, 6))]  # the live file and 5 old ones, no more
    assert all(path.stat().st_size <= 2000 for path in log_file.parent.iterdir())
    assert "INFO test: request 499 " in log_file.read_text()  # timestamped lines, newest in the live file


class ImpostorHealth(http.server.BaseHTTPRequestHandler):
    """Another program on the service's port that answers /health as a service would."""

    def do_GET(self) -> None:
        body = json.dumps({"status": "ok", "model": "impostor", "version": "1.0", "dimension": 1, "device": "cpu"})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_ready_means_this_launchs_process_answers(scripts: Scripts) -> None:
    """Another program takes the port while the service loads (after start_all.sh found it free): the service cannot
    listen and exits, and the other program answers /health. That is a failure naming the program on the port (this
    test's own process), never "ready"."""
    port = scripts.ports["siglip2"]
    launch = subprocess.Popen(
        [str(ROOT / "start_all.sh"), "--tiny", "siglip2"],
        env=scripts.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (scripts.log_dir / "siglip2.pid").exists():  # the service is starting (it listens once loaded)
        assert launch.poll() is None and time.monotonic() < deadline, launch.communicate()
        time.sleep(0.01)
    impostor = http.server.ThreadingHTTPServer(("127.0.0.1", port), ImpostorHealth)
    thread = threading.Thread(target=impostor.serve_forever, daemon=True)
    thread.start()
    try:
        stdout, stderr = launch.communicate(timeout=180)
    finally:
        impostor.shutdown()
        impostor.server_close()
    assert launch.returncode != 0, stdout + stderr
    assert "siglip2: ready" not in stdout
    assert "siglip2: FAILED" in stderr and f"pid={os.getpid()}" in stderr, stderr


def test_a_port_in_use_names_the_process_that_holds_it(scripts: Scripts) -> None:
    port = scripts.ports["qwen3"]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result = scripts.run("start_all.sh", "--tiny", "qwen3")
    assert result.returncode == 1
    assert f"port {port} is already in use by" in result.stderr and f"pid={os.getpid()}" in result.stderr


def test_the_rotated_log_has_every_line_once_in_order(tmp_path: Path) -> None:
    log_file = tmp_path / "svc.log"
    handler = RotatingLogFile(str(log_file), 2000, backups=20)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger("test")
    logger.addHandler(handler)
    for index in range(300):
        logger.info("request %d %s", index, "x" * 50)
    handler.close()
    files = [log_file.with_name(f"svc.log.{n}") for n in range(20, 0, -1) if (tmp_path / f"svc.log.{n}").exists()]
    files.append(log_file)
    assert len(files) > 5 and all(path.stat().st_size <= 2000 for path in files)
    lines = "".join(path.read_text() for path in files).splitlines()  # oldest file first
    assert lines == [f"request {index} {'x' * 50}" for index in range(300)]
