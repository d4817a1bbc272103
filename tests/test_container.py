"""The container image, built from the project's Dockerfile (CPU variant) and run for real: both services healthy
by Docker's own health status on the tiny models, the README's curl examples, a model mounted from the host giving
the host's vectors, a non-root user, ``docker stop`` draining a request in flight, the access log in
``docker logs``, the clear messages of a missing or unreadable model, the API key, and compose.yaml.

Marked ``container``: they need a docker daemon (see tests/containers.py for how the base image is made without a
registry). Without one they are skipped, except where EMBED_REQUIRE_DOCKER=1 (CI), where that is a failure.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient

from embed_client import EmbedClient
from qwen3_embed import Qwen3Settings
from qwen3_embed import build_app as build_text_app
from siglip2_embed import Siglip2Settings
from siglip2_embed import build_app as build_image_app
from tests import containers
from tests.doc_examples import Block, blocks, claimed_blocks
from tests.helpers import (
    free_port,
    image_bytes,
    photo_like,
    public_folder,
    readable_copy,
    wait_ready,
    write_example_photos,
)
from tests.test_readme_examples import as_run_here, runs_here, skipped

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "embed-test:cpu"
IMAGE_UID = 10001  # the Dockerfile's user
DRAIN_S = 30  # the services' default shutdown_timeout_s


@pytest.fixture(scope="module")
def docker_available() -> None:
    reason = containers.docker_missing()
    if reason is None:
        return
    if containers.REQUIRE_DOCKER:
        pytest.fail(f"{reason}, and EMBED_REQUIRE_DOCKER=1: the container tests must run here")
    pytest.skip(f"{reason}: the container tests need a docker daemon")


@pytest.fixture(scope="module")
def base(docker_available: None) -> str:
    return containers.pip_ready_base()


@pytest.fixture(scope="module")
def image(base: str) -> Iterator[str]:
    with containers.torch_cpu_index() as index_url:
        containers.build_image(IMAGE, base, index_url)
    yield IMAGE
    leftover = containers.docker("ps", "-aq", "--filter", f"label={containers.LABEL}", check=False).stdout.split()
    for container in leftover:
        containers.remove(container)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A folder the image's user may enter."""
    with public_folder("embed-container-") as folder:
        yield folder


def started(
    image: str, service: str, *args: str, env: dict[str, str] | None = None, volumes: tuple[str, ...] = ()
) -> tuple[str, int]:
    """``IMAGE service args...`` started in the background on a free port; (container id, port)."""
    port = free_port()
    port_variable = "SIGLIP2_PORT" if service == "siglip2" else "QWEN3_PORT"
    env = {port_variable: str(port), **(env or {})}
    return containers.start_container(image, service, *args, env=env, volumes=volumes), port


@pytest.fixture(scope="module")
def tiny_services(image: str) -> Iterator[tuple[tuple[str, int], tuple[str, int]]]:
    """siglip2 --tiny and qwen3 --tiny, each healthy by Docker's health status."""
    siglip = started(image, "siglip2", "--tiny")
    qwen3 = started(image, "qwen3", "--tiny")
    try:
        for container, _port in (siglip, qwen3):
            containers.wait_healthy(container)
        yield siglip, qwen3
    finally:
        for container, _port in (siglip, qwen3):
            containers.remove(container)


def test_the_build_context_holds_only_what_the_image_needs(base: str) -> None:
    """.dockerignore: the virtualenv, caches, logs and the git history never reach the daemon."""
    probe = f"FROM {base}\nCOPY . /context\n"
    tag = f"embed-test-context:{uuid.uuid4().hex[:8]}"
    containers.docker("build", "--network=host", "-t", tag, "-f", "-", str(ROOT), input=probe)
    try:
        listing = containers.docker("run", "--rm", "--network=host", tag, "find", "/context", "-mindepth", "1")
    finally:
        containers.docker("rmi", "-f", tag, check=False)
    paths = [line.removeprefix("/context/") for line in listing.stdout.split()]
    assert "common/loading.py" in paths and "siglip2_embed.py" in paths
    tops = {path.split("/")[0] for path in paths}
    assert tops <= {
        "common",
        "embed_client",
        "scripts",
        "tests",
        "requirements.txt",
        "siglip2_embed.py",
        "qwen3_embed.py",
    }, tops
    assert not [path for path in paths if "__pycache__" in path or path.startswith((".venv", ".git", ".cache", "logs"))]


def test_no_argument_prints_the_usage(image: str) -> None:
    result = containers.docker("run", "--rm", "--network=host", image, check=False, timeout=120)
    assert result.returncode == 0
    assert "usage: IMAGE siglip2" in result.stderr and "IMAGE qwen3" in result.stderr


def test_an_unknown_service_is_refused_with_the_usage(image: str) -> None:
    result = containers.docker("run", "--rm", "--network=host", image, "siglip", check=False, timeout=120)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_both_tiny_services_become_healthy(tiny_services: tuple[tuple[str, int], tuple[str, int]]) -> None:
    for (container, port), dimension in zip(tiny_services, (32, None), strict=True):
        assert containers.health_status(container) == "healthy"
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json()
        assert health["status"] == "ok" and health["tiny"] is True
        if dimension:
            assert health["dimension"] == dimension


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    write_example_photos(folder)
    return folder


def test_the_readme_curl_examples_answer_200(
    tiny_services: tuple[tuple[str, int], tuple[str, int]], photos: Path
) -> None:
    (_, image_port), (_, text_port) = tiny_services
    curl_blocks = [
        block
        for block in blocks(ROOT / "README.md")
        if runs_here(block) and block.language == "bash" and "curl " in block.body
    ]
    ran = 0
    for block in curl_blocks:
        lines = [line for line in block.commands() if not skipped(line)]
        script = 'set -euo pipefail\ncurl() { command curl -sS --fail-with-body "$@"; }\n' + "\n".join(lines)
        result = subprocess.run(
            ["bash", "-c", as_run_here(script, image_port, text_port)],
            cwd=photos,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"{block}\n--- stdout\n{result.stdout[-2000:]}\n--- stderr\n{result.stderr}"
        ran += sum(line.count("curl ") for line in lines)
    assert ran >= 8


def test_the_service_runs_as_a_non_root_user(tiny_services: tuple[tuple[str, int], tuple[str, int]]) -> None:
    for container, _port in tiny_services:
        status = containers.docker("exec", container, "sh", "-c", "grep -H '^Uid:' /proc/[0-9]*/status").stdout
        uids = {int(line.split()[1]) for line in status.splitlines()}  # the real uid of every process in it
        assert uids == {IMAGE_UID}, status
        processes = containers.docker("exec", container, "sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
        assert "_embed.py" in processes.stdout


def test_docker_logs_hold_the_access_line_with_the_request_id(
    tiny_services: tuple[tuple[str, int], tuple[str, int]],
) -> None:
    (container, port), _ = tiny_services
    request_id = f"container-test-{uuid.uuid4().hex[:8]}"
    response = httpx.post(
        f"http://127.0.0.1:{port}/embed/text", json={"text": "a cat"}, headers={"X-Request-ID": request_id}, timeout=60
    )
    assert response.status_code == 200
    deadline = time.monotonic() + 30
    while request_id not in (log := containers.logs(container)) and time.monotonic() < deadline:
        time.sleep(0.5)
    line = next((line for line in log.splitlines() if request_id in line), "")
    assert "POST /embed/text 200" in line, log[-3000:]


def test_the_text_service_lends_its_token_states(
    tiny_services: tuple[tuple[str, int], tuple[str, int]], tiny_zimage: Path
) -> None:
    """/embed/tokens in the container: the host's states of the same tiny model (built from the same seed), read by
    the client, and their mean is the container's own vector."""
    _, (_, port) = tiny_services
    texts = ["a cat", "", "一只猫在晒太阳"]
    with EmbedClient(f"http://127.0.0.1:{port}") as client:
        states = client.embed_tokens(texts)
        pooled = [text or "-" for text in texts]  # /embed/texts takes no empty text; its vector is unchecked
        vectors = client._json("POST", "/embed/texts", {"texts": pooled, "normalize": False})["embeddings"]
    with TestClient(build_text_app(Qwen3Settings(model=str(tiny_zimage)))) as host:
        wait_ready(host)
        expected = host.post("/embed/tokens", json={"texts": texts, "format": "json"}).json()["states"]
    for rows, reference, vector, text in zip(states, expected, vectors, texts, strict=True):
        np.testing.assert_allclose(rows, reference, atol=1e-5)
        if text:
            np.testing.assert_allclose(rows.mean(axis=0), vector, atol=1e-5)


def embeddings(port: int, inputs: list[str]) -> np.ndarray:
    response = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": inputs}, timeout=120)
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]])


def test_a_mounted_model_gives_the_hosts_vectors(image: str, tiny_siglip: Path, public_dir: Path) -> None:
    model = readable_copy(tiny_siglip, public_dir)
    container, port = started(
        image, "siglip2", env={"SIGLIP2_MODEL": "/models/siglip2-tiny"}, volumes=(f"{model}:/models/siglip2-tiny:ro",)
    )
    try:
        containers.wait_healthy(container)
        photo = "data:image/jpeg;base64," + base64.b64encode(image_bytes(photo_like(640, 480), "JPEG")).decode()
        inputs = ["a photo of a cat", photo]
        in_container = embeddings(port, inputs)
    finally:
        containers.remove(container)
    with TestClient(build_image_app(Siglip2Settings(model=str(model)))) as client:
        deadline = time.monotonic() + 120
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        on_host = np.array(
            [d["embedding"] for d in client.post("/v1/embeddings", json={"input": inputs}).json()["data"]]
        )
    cosine = (in_container * on_host).sum(1) / np.linalg.norm(in_container, axis=1) / np.linalg.norm(on_host, axis=1)
    assert cosine.min() >= 0.9999, cosine


def failed_start_log(image: str, *args: str, env: dict[str, str], volumes: tuple[str, ...] = ()) -> str:
    """``docker run IMAGE args...`` of a service that must not start: its exit status is non-zero; returns its log."""
    options = ["--rm", *containers.run_options({"SIGLIP2_PORT": str(free_port()), **env}, volumes)]
    result = containers.docker("run", *options, image, *args, check=False, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log
    return log


def test_a_missing_model_says_so_and_names_the_mount(image: str) -> None:
    log = failed_start_log(image, "siglip2", env={"SIGLIP2_MODEL": "/models/siglip2-so400m-patch16-512"})
    assert "Model not found: '/models/siglip2-so400m-patch16-512' is not a local folder" in log, log
    assert "hf download google/siglip2-so400m-patch16-512" in log
    assert "mount the folder that holds the model at /models (docker run -v /path/on/the/host:/models:ro" in log
    assert "Traceback" not in log


def test_the_default_hub_model_offline_says_so_and_names_the_mount(image: str) -> None:
    log = failed_start_log(image, "qwen3", env={"HF_HUB_OFFLINE": "1"})
    assert "Model not found: 'Tongyi-MAI/Z-Image-Turbo'" in log, log
    assert "at /models (docker run -v" in log


def test_a_model_file_the_user_may_not_read_says_so_with_the_user_id(
    image: str, tiny_siglip: Path, public_dir: Path
) -> None:
    """A host file of mode 0600 owned by root (the tests' user) in a mounted folder: permission denied, user id."""
    model = readable_copy(tiny_siglip, public_dir)
    (model / "model.safetensors").chmod(0o600)
    volumes = (f"{model}:/models/tiny:ro",)
    log = failed_start_log(image, "siglip2", env={"SIGLIP2_MODEL": "/models/tiny"}, volumes=volumes)
    owner = os.getuid()
    assert f"Permission denied: the model file /models/tiny/model.safetensors is owned by user id {owner}" in log, log
    assert f"this service runs as user id {IMAGE_UID} " in log
    assert "truncated or corrupt" not in log


@pytest.fixture(scope="module")
def keyed_qwen3(image: str) -> Iterator[tuple[str, int]]:
    """qwen3 --tiny with an API key, and a batch that waits 3 s for more items: a request stays in flight that long."""
    container, port = started(
        image, "qwen3", "--tiny", env={"EMBED_API_KEY": "container-secret", "EMBED_MAX_BATCH_WAIT_MS": "3000"}
    )
    try:
        containers.wait_healthy(container)
        yield container, port
    finally:
        containers.remove(container)


def test_a_hardened_container_is_healthy_and_keeps_its_keys_out_of_docker_inspect(image: str, public_dir: Path) -> None:
    """As docs/containers.md hardens it: a read-only root with a tmpfs /tmp, EMBED_ALLOWED_HOSTS (the advice off
    loopback; the container binds 0.0.0.0), the port from EMBED_PORT, an API key and an admin key from secret files.
    Docker's own health probe passes; the keys are in neither `docker inspect` nor PID 1's environment; and they
    are enforced, as the Host check is."""
    secrets = public_dir / "secrets"
    secrets.mkdir()
    (secrets / "api_key").write_text("inspect-must-not-show-this\n")
    (secrets / "admin_key").write_text("nor-this-admin-key\n")
    for path in (secrets, *secrets.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    port = free_port()
    env = {
        "EMBED_PORT": str(port),
        "EMBED_ALLOWED_HOSTS": '["embed.example.com"]',
        "EMBED_API_KEY_FILE": "/run/secrets/api_key",
        "EMBED_ADMIN_KEY_FILE": "/run/secrets/admin_key",
    }
    options = ("--read-only", "--tmpfs", "/tmp")
    container = containers.start_container(
        image, "qwen3", "--tiny", env=env, volumes=(f"{secrets}:/run/secrets:ro",), options=options
    )
    try:
        containers.wait_healthy(container, timeout=300)
        inspected = containers.docker("inspect", container).stdout
        environment = containers.docker("exec", container, "cat", "/proc/1/environ").stdout
        for secret in ("inspect-must-not-show-this", "nor-this-admin-key"):
            assert secret not in inspected and secret not in environment
        url, host = f"http://127.0.0.1:{port}", {"Host": "embed.example.com"}
        assert httpx.post(url + "/embed/text", json={"text": "a"}, headers=host, timeout=60).status_code == 401
        key = {**host, "Authorization": "Bearer inspect-must-not-show-this"}
        assert httpx.post(url + "/embed/text", json={"text": "a"}, headers=key, timeout=60).status_code == 200
        assert httpx.post(url + "/admin/sleep", headers=key, timeout=60).status_code == 403
        admin = {**host, "Authorization": "Bearer nor-this-admin-key"}
        assert httpx.post(url + "/admin/sleep", headers=admin, timeout=60).json()["state"] == "asleep"
        other = httpx.get(url + "/health", headers={"Host": "evil.example"}, timeout=60)
        assert other.status_code == 400
    finally:
        containers.remove(container)


def test_the_api_key_is_enforced(keyed_qwen3: tuple[str, int]) -> None:
    _, port = keyed_qwen3
    url = f"http://127.0.0.1:{port}/embed/text"
    refused = httpx.post(url, json={"text": "a cat"}, timeout=60)
    assert refused.status_code == 401 and refused.json()["error"]["code"]
    accepted = httpx.post(url, json={"text": "a cat"}, headers={"Authorization": "Bearer container-secret"}, timeout=60)
    assert accepted.status_code == 200
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200  # never behind the key


def test_docker_stop_lets_a_request_in_flight_finish_and_exits_0(keyed_qwen3: tuple[str, int]) -> None:
    container, port = keyed_qwen3
    answers: list[httpx.Response] = []

    def send() -> None:
        answers.append(
            httpx.post(
                f"http://127.0.0.1:{port}/embed/text",
                json={"text": "in flight"},
                headers={"Authorization": "Bearer container-secret"},
                timeout=60,
            )
        )

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(1.0)  # the request waits in its batch (3 s)
    started_stop = time.monotonic()
    containers.docker("stop", "--time", str(DRAIN_S + 15), container, timeout=120)
    stop_seconds = time.monotonic() - started_stop
    sender.join(60)
    assert answers and answers[0].status_code == 200, answers
    assert len(answers[0].json()["embedding"]) > 0
    final = containers.state(container)
    assert final["ExitCode"] == 0, containers.logs(container)[-3000:]
    assert stop_seconds < DRAIN_S  # drained and exited, not killed at the end of the grace period


# --- compose.yaml --------------------------------------------------------------------------------------------------


def compose(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    command = ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]
    result = subprocess.run(
        [*command, *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{command} {args}:\n{result.stdout}\n{result.stderr}"
    return result


def services_of(*files: str, env: dict[str, str]) -> dict[str, Any]:
    """The services as compose merges ``files`` (none: compose.yaml and compose.override.yaml, as compose reads them
    by default)."""
    args = [arg for name in files for arg in ("-f", name)]
    services: dict[str, Any] = yaml.safe_load(compose(*args, "config", env=env).stdout)["services"]
    return services


def test_compose_files_are_valid(docker_available: None, public_dir: Path) -> None:
    """`docker compose up` (compose.yaml and compose.override.yaml): the CUDA image with the GPU reserved; with
    compose.cpu.yaml instead: the CPU image and no GPU; both with a read-only root, the ports on loopback, the
    healthcheck, the drain's grace period and the settings passed through; compose.tiny.yaml and
    compose.secrets.yaml on top of either."""
    env = {"MODELS_DIR": str(public_dir), "EMBED_API_KEY": "from-the-env", "EMBED_SLEEP_MODE": "unload"}
    env["EMBED_DTYPE"] = "float32"
    gpu, cpu = services_of(env=env), services_of("compose.yaml", "compose.cpu.yaml", env=env)
    for name, port in (("siglip2", 6010), ("qwen3", 6011)):
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in device["capabilities"] for device in devices)
        assert gpu[name]["build"]["args"]["DEVICE"] == "cuda" and gpu[name]["image"] == "embed"
        assert "deploy" not in cpu[name] and cpu[name]["build"]["args"]["DEVICE"] == "cpu"
        assert cpu[name]["image"] == "embed:cpu"
        for service in (gpu[name], cpu[name]):
            assert service["command"] == [name]
            assert all(str(p).startswith(f"127.0.0.1:{port}:{port}") for p in service["ports"]), service["ports"]
            assert f"{public_dir}:/models:ro" in service["volumes"]
            assert service["read_only"] is True and "/tmp" in service["tmpfs"]
            assert service["restart"] == "unless-stopped"
            grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
            assert grace and int(grace.group(1)) > DRAIN_S
            assert service["healthcheck"]["test"][-2:] == ["-m", "scripts.container_health"]
            assert service["environment"]["EMBED_API_KEY"] == "from-the-env"
            assert service["environment"]["EMBED_SLEEP_MODE"] == "unload"
            assert service["environment"]["EMBED_DTYPE"] == "float32"
    for machine in ("compose.override.yaml", "compose.cpu.yaml"):
        tiny = services_of("compose.yaml", machine, "compose.tiny.yaml", env=env)
        assert tiny["siglip2"]["command"] == ["siglip2", "--tiny"] and tiny["qwen3"]["command"] == ["qwen3", "--tiny"]
    keys = public_dir / "keys"
    keys.mkdir()
    (keys / "api").write_text("secret\n")
    (keys / "admin").write_text("admin-secret\n")
    secret_env = {"MODELS_DIR": str(public_dir), "EMBED_API_KEY_SOURCE": str(keys / "api")}
    secret_env["EMBED_ADMIN_KEY_SOURCE"] = str(keys / "admin")
    with_secrets = services_of("compose.yaml", "compose.cpu.yaml", "compose.secrets.yaml", env=secret_env)
    for service in with_secrets.values():
        assert service["environment"]["EMBED_API_KEY_FILE"] == "/run/secrets/embed_api_key"
        assert service["environment"]["EMBED_ADMIN_KEY_FILE"] == "/run/secrets/embed_admin_key"
        # not set in this shell: passed as unset, never as a value
        assert service["environment"].get("EMBED_API_KEY") is service["environment"].get("EMBED_ADMIN_KEY") is None


def test_compose_on_a_machine_without_a_gpu(image: str, public_dir: Path) -> None:
    """The documented CPU way as written: compose.yaml, compose.cpu.yaml, compose.tiny.yaml and compose.secrets.yaml,
    and an override for this machine (host networking on free ports). Only the published ports are taken out of a
    copy of compose.yaml: publishing needs Docker's bridge network, which this machine does not have (an override
    cannot remove them). Both services become healthy, read-only, their keys from the secret files and enforced."""
    base = yaml.safe_load((ROOT / "compose.yaml").read_text())
    base.pop("x-service")  # its settings are merged into each service by now
    for service in base["services"].values():
        service.pop("ports")
    ports = {"siglip2": free_port(), "qwen3": free_port()}
    override = {
        "services": {
            name: {"network_mode": "host", "environment": [f"{name.upper()}_PORT={port}"]}
            for name, port in ports.items()
        }
    }
    files = public_dir / "compose"
    files.mkdir()
    (files / "compose.yaml").write_text(yaml.safe_dump(base))
    (files / "compose.host.yaml").write_text(yaml.safe_dump(override))
    for name in ("compose.cpu.yaml", "compose.tiny.yaml", "compose.secrets.yaml"):
        shutil.copy(ROOT / name, files / name)
    (files / "secrets").mkdir(mode=0o755)
    for name, key in (("api_key", "compose-api-key"), ("admin_key", "compose-admin-key")):
        (files / "secrets" / name).write_text(key + "\n")
        (files / "secrets" / name).chmod(0o644)
    project = f"embed-test-{uuid.uuid4().hex[:8]}"
    env = {"EMBED_IMAGE": image, "MODELS_DIR": str(public_dir), "COMPOSE_PROJECT_NAME": project}
    env["EMBED_IDLE_SLEEP_S"] = "600"  # from the shell, as a user who shares the GPU sets it
    names = ["compose.yaml", "compose.cpu.yaml", "compose.tiny.yaml", "compose.secrets.yaml", "compose.host.yaml"]
    args = ["--project-directory", str(files), *(arg for name in names for arg in ("-f", str(files / name)))]
    compose(*args, "up", "-d", "--no-build", env=env)
    try:
        containers_of = compose(*args, "ps", "-q", env=env).stdout.split()
        assert len(containers_of) == 2
        for container in containers_of:
            containers.wait_healthy(container)
            assert (
                containers.docker("inspect", "-f", "{{.HostConfig.ReadonlyRootfs}}", container).stdout.strip() == "true"
            )
            assert "compose-api-key" not in containers.docker("inspect", container).stdout
        auth = {"Authorization": "Bearer compose-api-key"}
        for port in ports.values():
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json()["tiny"] is True
            info = httpx.get(f"http://127.0.0.1:{port}/info", headers=auth, timeout=30).json()
            assert info["sleep"]["idle_sleep_s"] == 600
            assert httpx.post(f"http://127.0.0.1:{port}/embed/text", json={"text": "a"}, timeout=60).status_code == 401
            embedded = httpx.post(f"http://127.0.0.1:{port}/embed/text", json={"text": "a"}, headers=auth, timeout=60)
            assert embedded.status_code == 200, embedded.text
        networks = containers.docker("network", "ls", "--format", "{{.Name}}").stdout.split()
        assert not [n for n in networks if n.startswith(project)]  # host networking only: no bridge was made
    finally:
        compose(*args, "down", "-v", "-t", str(DRAIN_S + 15), env=env, timeout=300)


# --- the documentation's examples ----------------------------------------------------------------------------------

# A `docker` in front of the real one for the documentation's blocks: builds get this machine's base image and CPU
# torch (and DEVICE=cpu: no GPU here), runs get the host network and the test's free ports instead of -p, no
# --gpus, the tiny models in place of the host's model folder; the documentation's image and container names get
# the test's own, so that nothing of a user's is touched.
DOCKER_SHIM = r"""#!/usr/bin/env python3
import json, os, sys
config = json.loads(os.environ["DOCS_DOCKER"])
def renamed(arg):
    for name, replacement in config["names"].items():
        if arg == name or arg.startswith(name + ":"):
            return replacement + arg[len(name):]
    return arg
args = [renamed(arg) for arg in sys.argv[1:]]
if args[:1] == ["build"]:
    args += config["build_args"]
elif args[:1] == ["run"]:
    rest, out = args[1:], ["run", "--network=host", "--label", config["label"], "--label", config["run_label"]]
    out += ["-e", "SIGLIP2_PORT=%d" % config["ports"][0], "-e", "QWEN3_PORT=%d" % config["ports"][1]]
    while rest:
        arg = rest.pop(0)
        if arg in ("-p", "--gpus"):
            rest.pop(0)
        elif arg == "-v" and rest[0].split(":")[0] == config["models"][0]:
            out += ["-v", config["models"][1] + rest.pop(0)[len(config["models"][0]):]]
        else:
            out.append(arg)
    args = out
os.execv(config["docker"], ["docker", *args])
"""


def with_ports(text: str, image_port: int, text_port: int) -> str:
    """The examples' ports for the test's free ones (the docker shim publishes nothing: host networking)."""
    return re.sub(r"(localhost|127\.0\.0\.1):6010", rf"\g<1>:{image_port}", text).replace(":6011", f":{text_port}")


def in_running_order(claimed: list[Block]) -> list[str]:
    """docs/containers.md's blocks in page order, then the README's, which builds and runs the image as a new user
    first does."""
    return [block.body for block in sorted(claimed, key=lambda block: block.page.name == "README.md")]


def test_the_docs_examples_run(
    image: str, base: str, tiny_siglip: Path, tiny_zimage: Path, public_dir: Path, photos: Path
) -> None:
    """Every bash block of docs/containers.md, and of the README's container section, run in order."""
    models = public_dir / "models"
    models.mkdir(mode=0o755)
    readable_copy(tiny_siglip, models).rename(models / "siglip2-so400m-patch16-512")
    readable_copy(tiny_zimage, models).rename(models / "Z-Image-Turbo")
    suffix = uuid.uuid4().hex[:8]
    # The examples' own containers: the module's other containers (tiny_services) carry LABEL and are healthy too.
    run_label = f"{containers.LABEL}-docs={suffix}"
    shim = public_dir / "bin"
    shim.mkdir()
    (shim / "docker").write_text(DOCKER_SHIM)
    (shim / "docker").chmod(0o755)
    ports = free_port(), free_port()
    with containers.torch_cpu_index() as index_url:
        build_args = ["--network=host", "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "DEVICE=cpu"]
        build_args += ["--build-arg", f"TORCH_CPU_INDEX_URL={index_url}"] if index_url else []
        config = {
            "docker": shutil.which("docker"),
            "names": {name: f"{name}-docs-{suffix}" for name in ("embed-siglip2", "embed-qwen3", "embed")},
            "build_args": build_args,
            "label": containers.LABEL,
            "run_label": run_label,
            "ports": ports,
            "models": ["/mnt/hdd/models", str(models)],
        }
        env = {
            **os.environ,
            "PATH": f"{shim}:{os.environ['PATH']}",
            "DOCS_DOCKER": json.dumps(config),
            "DOCKER_BUILDKIT": "0",
        }
        examples = in_running_order(claimed_blocks("tests/test_container.py::test_the_docs_examples_run"))
        assert len(examples) >= 4
        try:
            for block in examples:
                run_block(block, env, ports, cwd=ROOT, label=run_label)
        finally:
            tags = [f"embed-docs-{suffix}", f"embed-docs-{suffix}:cpu"]
            containers.docker("rmi", *tags, check=False)


def run_block(block: str, env: dict[str, str], ports: tuple[int, int], cwd: Path, label: str) -> None:
    """One block in bash (set -euo pipefail; a curl that gets an HTTP error fails). A block that ends in a
    foreground `docker run` (the service in the terminal, as a user tries it) is stopped once its container (by
    ``label``) is healthy, as a user would with Ctrl-C or docker stop, and must then end with status 0."""
    script = 'set -euo pipefail\ncurl() { command curl -sS --fail-with-body "$@"; }\n' + with_ports(block, *ports)
    last = block.strip().splitlines()[-1]
    foreground = last.startswith("docker run") and " -d " not in last
    process = subprocess.Popen(
        ["bash", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 900
    stopped = False
    while process.poll() is None and time.monotonic() < deadline:
        if foreground and not stopped:
            running = containers.docker(
                "ps", "-q", "--filter", f"label={label}", "--filter", "health=healthy"
            ).stdout.split()
            if running:
                containers.docker("stop", "--time", str(DRAIN_S + 15), *running, timeout=120)
                stopped = True
        time.sleep(1)
    if process.poll() is None:
        process.kill()
    out, err = process.communicate()
    assert process.returncode == 0, f"{block}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
    assert not foreground or stopped, block
    assert '"error"' not in out
