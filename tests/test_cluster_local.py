"""The front door and the import on a Ray of their own (no ``--address``), as on one box: every server of that Ray
on loopback (but the one gRPC port Serve binds for each replica, which refuses a call without the token), ``--tiny``,
a front door whose models cannot load stopping with the replica's own message, and the private Ray names
cluster/ray_private.py relies on.

Each command runs as a user would start it, with HOME and Ray's temporary folder in the test's own folders (the token
Ray makes for a new local Ray lands there), the object store at 2 % of the memory, and, in that temporary folder, a
``ray_current_cluster`` file naming a Ray that is gone, as ``ray start`` leaves one behind: a command that starts its
own Ray must not try to join it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import requests
import yaml

from common.api.middleware import is_loopback
from tests.doc_examples import claimed_command
from tests.helpers import Process, free_port, listening_sockets, outliving, process_tree, write_example_photos

ROOT = Path(__file__).resolve().parent.parent
CPU_CONFIG = ROOT / "cluster" / "serve_config_cpu.yaml"
TINY_BANNER = "--tiny: these applications run TINY RANDOM-WEIGHT MODELS. Their vectors are MEANINGLESS noise"


def own_ray_environment(home: Path, ray_tmp: Path) -> dict[str, str]:
    """This process's environment without Ray's variables (no address, no token), with the test's HOME and Ray
    folder, a small object store, and a stale ``ray_current_cluster`` in that folder."""
    (ray_tmp / "ray").mkdir(parents=True, exist_ok=True)
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")  # nothing listens there
    unset = ("SIGLIP2_MODEL", "QWEN3_MODEL")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in unset}
    return {
        **env,
        "HOME": str(home),
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.02",
    }


@contextmanager
def own_ray_folders(folder: Path) -> Iterator[tuple[Path, Path]]:
    """(HOME, Ray's temporary folder): the one short, as Ray's socket paths under it must fit in 107 bytes."""
    home = folder / "home"
    home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    try:
        yield home, ray_tmp
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture
def ray_folders(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    with own_ray_folders(tmp_path) as folders:
        yield folders


def config_with_port(folder: Path, port: int) -> Path:
    config = yaml.safe_load(CPU_CONFIG.read_text())
    config["http_options"]["port"] = port
    path = folder / "serve_config_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def stop_and_wait(front: subprocess.Popen[bytes], started: list[Process], log: Path) -> int:
    """SIGTERM to the front door; its exit status, once every process it started is gone (any left is killed, and
    the test fails)."""
    if front.poll() is None:
        front.send_signal(signal.SIGTERM)
    try:
        code = front.wait(timeout=120)
    finally:
        if front.poll() is None:
            front.kill()
            front.wait()
    left = outliving(started)  # only the processes of this front door's tree
    assert not left, f"processes of the front door's Ray outlived it: {left}\n{log.read_text()[-3000:]}"
    return code


@dataclass
class FrontDoor:
    base: str
    pid: int
    log: Path


@pytest.fixture(scope="module")
def front_door_on_its_own_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontDoor]:
    """``python -m cluster.front cluster/serve_config_cpu.yaml --tiny`` as docs/ray.md has it (the config on a free
    port), until both applications answer /health 200; stopped by SIGTERM, which must end every process it started."""
    tmp_path = tmp_path_factory.mktemp("front")
    port, serve_port = free_port(), free_port()
    command = claimed_command(
        "tests/test_cluster_local.py::front_door_on_its_own_ray",
        {str(CPU_CONFIG.relative_to(ROOT)): str(config_with_port(tmp_path, port))},
        ["--serve-port", str(serve_port)],
    )
    with own_ray_folders(tmp_path) as ray_folders:
        yield from started_front_door(command, port, ray_folders, tmp_path / "front.log")


def started_front_door(command: list[str], port: int, ray_folders: tuple[Path, Path], log: Path) -> Iterator[FrontDoor]:
    with open(log, "wb") as out:
        front = subprocess.Popen(
            command, cwd=ROOT, env=own_ray_environment(*ray_folders), stdout=out, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    started: list[Process] = []
    try:
        deadline = time.monotonic() + 300
        while True:
            assert front.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            started = process_tree(front.pid)
            try:
                codes = [requests.get(f"{base}/{app}/health", timeout=10).status_code for app in ("siglip2", "qwen3")]
            except requests.ConnectionError:  # not listening yet
                codes = []
            if codes == [200, 200]:
                break
            time.sleep(1)
        started = process_tree(front.pid)
        yield FrontDoor(base, front.pid, log)
    finally:
        assert stop_and_wait(front, started or process_tree(front.pid), log) == 0, log.read_text()[-3000:]


def unauthenticated_call(port: int) -> grpc.StatusCode:
    """The status of a call without Ray's token to Serve's gRPC service on ``port`` (any method Serve serves)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest", lambda b: b, lambda b: b)
        try:
            call(b"", timeout=10)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


@pytest.mark.slow
def test_a_front_door_whose_models_cannot_load_stops_with_the_replicas_message(
    ray_folders: tuple[Path, Path], tmp_path: Path
) -> None:
    """No model on disk (SIGLIP2_MODEL and QWEN3_MODEL name folders that do not exist): the replicas' own message,
    which says what to download, and exit 1, with Serve and Ray stopped; Serve alone would start replicas forever."""
    env = {
        **own_ray_environment(*ray_folders),
        "SIGLIP2_MODEL": str(tmp_path / "no-siglip2"),
        "QWEN3_MODEL": str(tmp_path / "no-zimage"),
    }
    command = [sys.executable, "-m", "cluster.front", str(config_with_port(tmp_path, free_port()))]
    command += ["--serve-port", str(free_port())]
    log = tmp_path / "front.log"
    started_at = time.monotonic()
    with open(log, "wb") as out:
        front = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    started: dict[tuple[int, int], Process] = {}
    try:
        while front.poll() is None and time.monotonic() - started_at < 240:
            started.update({(p.pid, p.started): p for p in process_tree(front.pid)})
            time.sleep(0.5)
    finally:
        code = stop_and_wait(front, list(started.values()), log)
    took = time.monotonic() - started_at
    text = log.read_text()
    assert code == 1, text[-3000:]
    assert "a replica cannot start, and trying again would fail the same way: Model not found: '" in text, text[-3000:]
    assert "is not a local folder. Download it first" in text
    assert "--tiny tries the commands on tiny random-weight models" in text
    assert "stopping Serve with the front door's own Ray" in text  # not Serve's graceful shutdown: 20-30 s more
    assert took < 200, took  # measured: 26-30 s on an idle 2-core machine (40 s while it waited for Serve to stop)


@pytest.mark.slow
def test_the_import_runs_on_a_tiny_model_on_a_ray_of_its_own(ray_folders: tuple[Path, Path], tmp_path: Path) -> None:
    """``--tiny`` for the import as docs/ray.md has it, on a Ray the job starts, on loopback; the loud warning."""
    (tmp_path / "photos").mkdir()
    photos = write_example_photos(tmp_path / "photos")
    command = claimed_command(
        "tests/test_cluster_local.py::test_the_import_runs_on_a_tiny_model_on_a_ray_of_its_own",
        {"~/Pictures": str(photos), "vectors/": str(tmp_path / "index")},
        ["--batch-size", "4"],
    )
    result = subprocess.run(
        command, cwd=ROOT, env=own_ray_environment(*ray_folders), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["embedded"], summary["failed"]) == (6, 0)
    assert "started a local Ray at 127.0.0.1:" in result.stderr
    assert "--tiny: this import runs TINY RANDOM-WEIGHT MODELS" in result.stderr


def test_the_private_ray_names_are_where_cluster_ray_private_expects_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray upgrade that moves them fails here, not in a command that would quietly listen everywhere again."""
    import ray
    from ray._private import ray_constants, services
    from ray.serve._private.api import serve_start
    from ray.serve._private.client import ServeControllerClient

    from cluster.ray_private import LOCAL_ONLY_VARIABLE, local_ray_on_loopback

    assert not ray.is_initialized()  # else the node's own address would answer below
    monkeypatch.delenv(LOCAL_ONLY_VARIABLE, raising=False)
    assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR == LOCAL_ONLY_VARIABLE
    before = ray_constants.ENABLE_RAY_CLUSTER
    with local_ray_on_loopback():
        assert services.get_node_ip_address() == "127.0.0.1"  # what ray.init then gives the node
        assert os.environ[LOCAL_ONLY_VARIABLE] == "0"  # for the processes it starts
    assert LOCAL_ONLY_VARIABLE not in os.environ and ray_constants.ENABLE_RAY_CLUSTER is before
    assert {"http_options", "proxy_location", "grpc_options", "controller_options"} <= set(
        inspect.signature(serve_start).parameters
    )
    assert "_blocking" in inspect.signature(ServeControllerClient.deploy_apps).parameters


# The tests of the module's front door come last: its Ray stays up until the module ends, and no other runs beside it.


@pytest.mark.slow
def test_a_ray_of_its_own_listens_on_loopback(front_door_on_its_own_ray: FrontDoor) -> None:
    """Every listening socket of the front door's Ray is on loopback: the GCS, the raylet and object manager, the
    dashboard, its agents and metrics, every worker and the front door itself; but for the one Serve binds to every
    interface in each replica (its gRPC server between deployments), which refuses a call without the token."""
    sockets = listening_sockets(process_tree(front_door_on_its_own_ray.pid))
    names = {holder.name.split()[0].rsplit("/", 1)[-1] for holder, address, _ in sockets if is_loopback(address)}
    # the control plane is among them (the front door is the python of its command line)
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::ServeController"} <= names
    elsewhere = [(holder.name, address, port) for holder, address, port in sockets if not is_loopback(address)]
    # a replica's process title names the method it runs at that moment (".handle_request_with_rejection")
    replicas = sorted(name.split(".")[0] for name, _, _ in elsewhere)
    assert replicas == ["ray::ServeReplica:qwen3:qwen3", "ray::ServeReplica:siglip2:siglip2"], elsewhere
    assert {address for _, address, _ in elsewhere} == {"::"}
    for _, _, port in elsewhere:
        assert unauthenticated_call(port) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.slow
def test_the_front_door_serves_tiny_models_saying_so(front_door_on_its_own_ray: FrontDoor) -> None:
    """``--tiny``: both applications on the tiny models, built under .cache/tiny-models/ in the folder of
    ./start_all.sh --tiny (the first 12 hex digits of the builder's SHA-256), with the loud warning in the log."""
    base = front_door_on_its_own_ray.base
    for app in ("siglip2", "qwen3"):
        health = requests.get(f"{base}/{app}/health", timeout=10).json()
        assert health["tiny"] is True and health["dimension"] == 32, health
    vector = requests.post(f"{base}/qwen3/embed/text", json={"text": "a cat"}, timeout=30).json()["embedding"]
    assert len(vector) == 32
    builder = hashlib.sha256((ROOT / "common" / "tiny_models.py").read_bytes()).hexdigest()[:12]
    built = ROOT / ".cache" / "tiny-models" / builder
    assert sorted(p.name for p in built.iterdir()) == ["qwen3", "siglip", "zimage"]
    assert TINY_BANNER in front_door_on_its_own_ray.log.read_text()
