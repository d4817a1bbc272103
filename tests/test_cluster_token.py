"""The multi-machine recipe of docs/ray.md: a head and another node started as documented, with token
authentication, refuse a driver without the token and run the tasks of one with it.

Both nodes run on this machine with the documented commands, each on free ports of its own, with HOME (where the
token is written and read) and Ray's temporary folder in the test's own folders, 1 CPU and a 100 MB object store
each, no dashboard, and ``--block``, so that SIGTERM to each one's PID stops every process it started.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.doc_examples import claimed_blocks, venv_words
from tests.helpers import outliving, process_tree

ROOT = Path(__file__).resolve().parent.parent
# The documented ports, each replaced by a free one of the test's.
DOCUMENTED_PORTS = ["6379", "6380", "6381", "6382", "6383", "6384", "6385"]
DOCUMENTED_WORKER_PORTS = ("10002", "10999")
# A driver: the answer of a task run on the cluster, or why it could not connect.
DRIVER = """
import sys, ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
except ConnectionError as exc:
    print("refused:", exc)
    raise SystemExit(3)
nodes = len([node for node in ray.nodes() if node["Alive"]])
print("answer:", ray.get(ray.remote(lambda: 6 * 7).remote()), "on", nodes, "nodes")
"""


def free_ports(count: int) -> list[int]:
    """``count`` consecutive free ports (Ray's worker range is a range)."""
    for start in range(31000, 60000, 97):
        socks = []
        try:
            for port in range(start, start + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("", port))
            return list(range(start, start + count))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port range")


def ray_environment(home: Path, ray_tmp: Path) -> dict[str, str]:
    """The test's environment without anything of Ray's: no token, no mode, no address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "HOME": str(home), "RAY_TMPDIR": str(ray_tmp)}


def documented_command(line: str, env: dict[str, str], ports: dict[str, str]) -> tuple[list[str], dict[str, str], str]:
    """A line of the block as a shell runs it: leading NAME=value words into the environment, ``~/`` in HOME, the
    documented ports replaced by the test's, and a trailing ``> FILE``; returns (words, env, stdout file)."""
    words = shlex.split(venv_words(line), comments=True)
    env = dict(env)
    while words and "=" in words[0] and not words[0].startswith(("/", ".")):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    stdout = ""
    if len(words) >= 2 and words[-2] == ">":
        stdout, words = words[-1], words[:-2]
    home = env["HOME"]
    words = [home + word[1:] if word.startswith("~/") else ports.get(word, word) for word in words]
    return words, env, stdout


@dataclass
class Cluster:
    address: str  # the head's GCS
    token_file: Path
    ray_tmp: Path


# Per node: the documented ports, and 20 worker ports.
PORTS_PER_NODE = len(DOCUMENTED_PORTS) + 20


def port_replacements(ports: list[int]) -> dict[str, str]:
    """The documented ports -> ``ports`` (PORTS_PER_NODE free ones, the worker range last)."""
    replace = dict(zip(DOCUMENTED_PORTS, map(str, ports), strict=False))
    replace.update(zip(DOCUMENTED_WORKER_PORTS, (str(ports[-20]), str(ports[-1])), strict=True))
    return replace


class Nodes:
    """``ray start --block`` processes, each stopped by SIGTERM to its PID (which stops what it started)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, words: list[str], env: dict[str, str], name: str) -> None:
        log = self.folder / f"{name}.log"
        with open(log, "wb") as out:
            node = subprocess.Popen(words, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.started.append((node, log))
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in log.read_bytes():
            assert node.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)

    def stop(self) -> None:
        processes = [p for node, _ in self.started for p in process_tree(node.pid)]
        for node, _ in reversed(self.started):  # the other node first, then the head
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(timeout=60)
            finally:
                if node.poll() is None:
                    node.kill()
                    node.wait()
        left = outliving(processes)  # only the nodes' own processes
        assert not left, f"processes of the nodes outlived them: {left}"


# Small nodes, each stopped by SIGTERM to its PID.
SMALL_NODE = ["--block", "--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats"]


@pytest.fixture
def documented_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """The head and one other node, started by the blocks of docs/ray.md: the head's block makes the token (in the
    head's HOME) and starts the head; the other node's gets the token as a file named by RAY_AUTH_TOKEN_PATH."""
    head_home, node_home = tmp_path / "head-home", tmp_path / "node-home"
    head_home.mkdir()
    node_home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    # One machine: each node its own ports; and the head's Ray Client port (10001 by default).
    ports = free_ports(2 * PORTS_PER_NODE + 1)
    head_ports = port_replacements(ports[:PORTS_PER_NODE])
    node_ports = port_replacements(ports[PORTS_PER_NODE : 2 * PORTS_PER_NODE])
    head_only = ["--include-dashboard=false", f"--ray-client-server-port={ports[-1]}"]
    head_block, node_block = claimed_blocks("tests/test_cluster_token.py::documented_cluster")
    *setup, head_start = head_block.commands()
    (node_start,) = node_block.commands()
    every_port = {*DOCUMENTED_PORTS, *DOCUMENTED_WORKER_PORTS}
    assert every_port <= set(head_start.split()), head_start
    assert every_port - {"6379"} | {"HEAD:6379"} <= set(node_start.split()), node_start
    env = ray_environment(head_home, ray_tmp)
    for line in setup:
        words, line_env, stdout = documented_command(line, env, head_ports)
        with open(stdout or os.devnull, "wb") as out:
            subprocess.run(words, env=line_env, stdout=out, check=True, timeout=120, cwd=ROOT)
    token_file = head_home / ".ray" / "auth_token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    address = f"127.0.0.1:{head_ports['6379']}"
    nodes = Nodes(tmp_path)
    try:
        words, head_env, _ = documented_command(head_start, env, head_ports)
        assert head_env["RAY_AUTH_MODE"] == "token"
        nodes.start([*words, *SMALL_NODE, *head_only], head_env, "head")
        node_env = {**ray_environment(node_home, ray_tmp), "RAY_AUTH_TOKEN_PATH": str(token_file)}
        words, node_env, _ = documented_command(node_start, node_env, {**node_ports, "HEAD:6379": address})
        assert node_env["RAY_AUTH_MODE"] == "token"
        nodes.start([*words, *SMALL_NODE], node_env, "node")
        yield Cluster(address, token_file, ray_tmp)
    finally:
        try:
            nodes.stop()
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)


def run_driver(cluster: Cluster, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, cluster.address],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_the_documented_head_refuses_a_driver_without_the_token(documented_cluster: Cluster, tmp_path: Path) -> None:
    """A driver on another HOME (no ~/.ray/auth_token) and without RAY_AUTH_MODE cannot connect, let alone run code;
    a driver given the token, as a file (RAY_AUTH_TOKEN_PATH) or as the variable (RAY_AUTH_TOKEN), runs a task on the
    cluster of both nodes."""
    stranger_home = tmp_path / "stranger"
    stranger_home.mkdir()
    stranger_env = ray_environment(stranger_home, documented_cluster.ray_tmp)
    stranger = run_driver(documented_cluster, stranger_env)  # refused only after Ray's retries: meanwhile the others
    token = documented_cluster.token_file.read_text().strip()
    for given in ({"RAY_AUTH_TOKEN_PATH": str(documented_cluster.token_file)}, {"RAY_AUTH_TOKEN": token}):
        friend = run_driver(documented_cluster, {**stranger_env, "RAY_AUTH_MODE": "token", **given})
        out, err = friend.communicate(timeout=120)
        assert (friend.returncode, out.strip()) == (0, "answer: 42 on 2 nodes"), err[-3000:]
    out, err = stranger.communicate(timeout=120)
    assert stranger.returncode == 3 and "refused:" in out, (out, err[-3000:])
    assert "Authentication token is missing or incorrect" in err
