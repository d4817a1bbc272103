"""The services on Ray Serve (cluster/serve.py, cluster/serve_config.yaml).

A local Ray (2 CPUs, and three declared GPUs so that the config file's GPU fractions can be scheduled; the replicas
still run on the CPU) gets both applications, 2 replicas each, from the config file through ``serve run``, as a
user would start them. Every answer through the proxy is compared with the standalone app of the same settings
(``build_app`` in a TestClient): every route, batched and concurrent, the openai client, ``EmbedClient`` and the
indexer against the ``/siglip2`` prefix, the error envelope, the API key and request ids. Then: a replica whose
model is loading gets no request, and a replica killed under load is replaced. The first part of the module needs
no Ray: the pieces of cluster/serve.py on their own.
"""

from __future__ import annotations

import base64
import collections
import functools
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pyarrow.parquet as pq
import pytest
import requests
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cluster.serve import EmbeddingReplica, HealthWaitsForEveryReplica, application, settings_from_args
from common.config import ServiceSettings
from common.contract import EmbeddingModel
from embed_client import EmbedClient
from qwen3_embed import Qwen3Settings
from qwen3_embed import build_app as build_text_app
from siglip2_embed import Siglip2Service, Siglip2Settings, load
from siglip2_embed import build_app as build_image_app
from tests.helpers import image_bytes, photo_like, ready_client

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "cluster" / "serve_config.yaml"
KEY = "cluster-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JPEG = image_bytes(photo_like(64, 48, seed=1), "JPEG")
PNG = image_bytes(photo_like(30, 70, seed=2))
B64 = base64.b64encode(PNG).decode()
DATA_URI = "data:image/png;base64," + B64
JSON = "application/json"

# The image service's settings in both worlds; flag-style names, as a config file may write them.
SIGLIP_ARGS: dict[str, Any] = {
    "api-key": KEY,
    "max-items-per-request": 4,
    "max_image_bytes": 200_000,
    "max_body_bytes": 1_000_000,
    "device": "cpu",
    "log_level": "warning",
}
QWEN3_ARGS: dict[str, Any] = {"device": "cpu", "log_level": "warning"}


def siglip_settings(model: Path) -> Siglip2Settings:
    return Siglip2Settings(model=str(model), **{key.replace("-", "_"): value for key, value in SIGLIP_ARGS.items()})


# ---------------------------------------------------------------------------------------------------------------
# cluster/serve.py without Ray
# ---------------------------------------------------------------------------------------------------------------


def test_args_are_the_flags_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGLIP2_MODEL", "/models/from-env")
    monkeypatch.setenv("EMBED_MAX_BATCH_SIZE", "7")
    settings = settings_from_args("siglip2", {"max-items-per-request": "3", "--jpeg-draft": False})
    assert isinstance(settings, Siglip2Settings)
    assert (settings.model, settings.max_batch_size, settings.max_items_per_request) == ("/models/from-env", 7, 3)
    assert settings.jpeg_draft is False
    assert settings_from_args("siglip2", {"model": "/m", "max_batch_size": 9}).max_batch_size == 9
    assert isinstance(settings_from_args("qwen3", {"layer": -1}), Qwen3Settings)


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("siglip2", {"max_batch_sise": 3}, "unknown setting 'max_batch_sise'.*siglip2_embed.py --help"),
        ("siglip2", {"port": 9000}, "not used under Ray Serve.*http_options.port"),
        ("qwen3", {"log-file": "x.log"}, "not used under Ray Serve"),
        ("qwen3", {"pooling": "max"}, "invalid setting: pooling"),
        ("clip", {}, "unknown service 'clip'"),
    ],
)
def test_bad_args_fail_when_the_application_is_built(name: str, args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        application(name, args)


@pytest.fixture
def quiet_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica sets up logging for its own process; not for the test process."""
    monkeypatch.setattr("cluster.serve.configure_logging", lambda level: None)


@pytest.mark.usefixtures("quiet_replicas")
def test_a_replica_starts_only_with_a_loaded_model(tiny_siglip: Path) -> None:
    """What Serve does with a replica, step by step: build the app, run its lifespan start-up (the replica counts as
    running once it returns), then ask ``check_health`` from time to time."""
    replica = EmbeddingReplica("siglip2", siglip_settings(tiny_siglip))
    app = replica.__serve_build_asgi_app__()
    with pytest.raises(RuntimeError, match="loading"):
        replica.check_health()
    with TestClient(app) as client:  # enters the lifespan: returns only once the model is loaded
        assert client.get("/health").status_code == 200
        replica.check_health()
        response = client.get("/health", headers={"X-Request-ID": "abc"})
        assert "x-request-id" not in response.headers  # Serve's proxy adds it (once)
        assert app.state.runtime.model is not None
        app.state.runtime.model.healthy = False  # what three failed forward passes in a row do
        with pytest.raises(RuntimeError, match="unhealthy"):
            replica.check_health()


@pytest.mark.usefixtures("quiet_replicas")
def test_a_replica_health_says_the_dimension_under_both_names(tiny_siglip: Path, tiny_zimage: Path) -> None:
    """Serve's /health passes the app's own 200 body on: ``dimensions`` (the name clients of the Quadux SigLIP API
    read) beside ``dimension``, on both services."""
    for replica in (
        EmbeddingReplica("siglip2", siglip_settings(tiny_siglip)),
        EmbeddingReplica("qwen3", Qwen3Settings(model=str(tiny_zimage), device="cpu")),
    ):
        with TestClient(replica.__serve_build_asgi_app__()) as client:
            health = client.get("/health").json()
        assert health["status"] == "ok" and health["dimensions"] == health["dimension"] == 32


@pytest.mark.usefixtures("quiet_replicas")
@pytest.mark.parametrize("model", ["missing-folder", "example-org/not-in-the-cache"])
def test_a_replica_whose_model_fails_to_load_fails_to_start_saying_why(
    model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start-up error is what `serve status` shows: it carries the reason and the download help. A hub id goes
    the way of the standalone main (download when not cached; here the hub is off)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    replica = EmbeddingReplica("siglip2", Siglip2Settings(model=model, device="cpu"))
    app = replica.__serve_build_asgi_app__()
    expected = f"(?s)did not load: Model not found: '{model}'.*huggingface-cli download"
    with pytest.raises(RuntimeError, match=expected), TestClient(app):
        pass


class ScriptedDeployment:
    """Stands in for Serve's controller, which runs only on a Ray cluster (the Ray tests below ask the real one)."""

    def __init__(self, status: str, replicas: dict[str, int]) -> None:
        self.answer: tuple[str, dict[str, int]] | Exception = (status, replicas)
        self.asked = 0

    def __call__(self) -> tuple[str, dict[str, int]]:
        self.asked += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _health_app(controller: ScriptedDeployment) -> TestClient:
    app = FastAPI()
    app.get("/health")(lambda: {"status": "ok"})
    app.post("/embed/text")(lambda: {"dimension": 1})
    return TestClient(HealthWaitsForEveryReplica(app, deployment_status=controller), root_path="/siglip2")


def test_health_is_503_until_every_replica_is_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cluster.serve.DEPLOYMENT_STATUS_TTL_S", 0.0)
    controller = ScriptedDeployment("UPDATING", {"RUNNING": 1, "STARTING": 1})
    client = _health_app(controller)
    response = client.get("/siglip2/health")
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert response.json() == {"status": "loading", "replicas": {"RUNNING": 1, "STARTING": 1}}
    assert client.post("/siglip2/embed/text").status_code == 200  # the ready replica serves meanwhile
    controller.answer = ("UNHEALTHY", {"RUNNING": 1, "STARTING": 1})
    assert client.get("/siglip2/health").json()["status"] == "unhealthy"
    for serving in ("HEALTHY", "UPSCALING", "DOWNSCALING"):  # autoscaling never takes it out of a load balancer
        controller.answer = (serving, {"RUNNING": 2, "STARTING": 1})
        assert client.get("/siglip2/health").json() == {"status": "ok"}, serving
    controller.answer = RuntimeError("the controller is restarting")
    assert client.get("/siglip2/health").status_code == 200  # the replica answers for itself


@pytest.mark.parametrize("answer", [("HEALTHY", {"RUNNING": 2}), RuntimeError("no controller")])
def test_health_asks_the_controller_at_most_once_a_second(answer: Any) -> None:
    controller = ScriptedDeployment("HEALTHY", {})
    controller.answer = answer
    client = _health_app(controller)
    for _ in range(20):
        assert client.get("/siglip2/health").status_code == 200
    assert controller.asked == 1


# ---------------------------------------------------------------------------------------------------------------
# A local Ray with both applications from the config file
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Cluster:
    base: str  # http://127.0.0.1:PORT
    siglip: str  # .../siglip2
    qwen3: str  # .../qwen3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def replica_states(app: str, deployment_name: str | None = None) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications.get(app)
    # No deployment while the application is being built.
    deployment = status.deployments.get(deployment_name or app) if status is not None else None
    states = deployment.replica_states if deployment is not None else {}
    # Typed as ReplicaState (a str enum), given as plain strings: the same keys either way.
    return {str(getattr(state, "value", state)): count for state, count in states.items()}


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {serve.status()}"
        time.sleep(0.2)


def config_for_tests(tiny_zimage: Path, port: int, replicas: int, num_cpus: float) -> dict[str, Any]:
    """cluster/serve_config.yaml with a free port, the test's replica counts and CPUs, and tiny models."""
    config: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    config["http_options"]["port"] = port
    apps = {app["name"]: app for app in config["applications"]}
    assert {name: app["route_prefix"] for name, app in apps.items()} == {"siglip2": "/siglip2", "qwen3": "/qwen3"}
    apps["siglip2"]["args"] = SIGLIP_ARGS  # the model from SIGLIP2_MODEL, as the config file expects by default
    apps["qwen3"]["args"] = {"model": str(tiny_zimage), **QWEN3_ARGS}
    for app in apps.values():
        (deployment,) = app["deployments"]
        assert 0 < deployment["ray_actor_options"]["num_gpus"] < 1
        deployment["num_replicas"] = replicas
        deployment["ray_actor_options"]["num_cpus"] = num_cpus
    return config


@pytest.fixture(scope="module")
def cluster(tiny_siglip: Path, tiny_zimage: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    import ray
    from ray import serve

    port = free_port()
    config_path = tmp_path_factory.mktemp("serve") / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config_for_tests(tiny_zimage, port, replicas=2, num_cpus=0.25)))
    with pytest.MonkeyPatch.context() as env:
        # Read where Ray builds the application: its processes inherit this process's environment.
        env.setenv("SIGLIP2_MODEL", str(tiny_siglip))
        ray.init(
            num_cpus=2,
            # Declared only, for the config's GPU fractions (2 x 0.3 + 2 x 0.6; a fraction must fit on one GPU, and
            # Ray packs them greedily); the replicas use the CPU.
            num_gpus=3,
            include_dashboard=False,
            object_store_memory=400 * 1024 * 1024,
            log_to_driver=False,
        )
    try:
        serve_cli = Path(sys.executable).parent / "serve"
        address = ray.get_runtime_context().gcs_address
        command = [str(serve_cli), "run", "--non-blocking", "--address", address, "--app-dir", str(ROOT)]
        subprocess.run([*command, str(config_path)], cwd=ROOT, check=True, timeout=180, capture_output=True)
        wait_for(
            lambda: all(replica_states(app).get("RUNNING", 0) == 2 for app in ("siglip2", "qwen3")),
            timeout=180,
            what="both applications to run 2 replicas",
        )
        base = f"http://127.0.0.1:{port}"
        yield Cluster(base, base + "/siglip2", base + "/qwen3")
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def image_ref(tiny_siglip: Path) -> Iterator[TestClient]:
    yield from ready_client(build_image_app(siglip_settings(tiny_siglip)))


@pytest.fixture(scope="module")
def text_ref(tiny_zimage: Path) -> Iterator[TestClient]:
    yield from ready_client(build_text_app(Qwen3Settings(model=str(tiny_zimage), **QWEN3_ARGS)))


def assert_same(got: Any, expected: Any, path: str = "") -> None:
    """Equal JSON, numbers to float32 noise (the replicas batch requests differently)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and set(got) == set(expected), (path, got, expected)
        for key in expected:
            assert_same(got[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), path
        for index, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same(a, b, f"{path}[{index}]")
    elif isinstance(expected, float) and not isinstance(expected, bool):
        assert got == pytest.approx(expected, abs=2e-5), path
    else:
        assert got == expected, (path, got, expected)


Call = tuple[str, str, dict[str, Any]]  # method, path, request arguments (json/files/data/content/headers)


def via_serve(base: str, call: Call) -> requests.Response:
    method, path, kwargs = call
    kwargs = dict(kwargs)
    if "content" in kwargs:
        kwargs["data"] = kwargs.pop("content")
    return requests.request(method, base + path, timeout=60, **kwargs)


def assert_parity(reference: TestClient, base: str, call: Call) -> None:
    expected = reference.request(call[0], call[1], **call[2])
    got = via_serve(base, call)
    assert got.status_code == expected.status_code, (call[1], got.text, expected.text)
    assert got.headers["content-type"] == expected.headers["content-type"]
    assert_same(got.json(), expected.json(), call[1])


IMAGE_CALLS: list[Call] = [
    ("POST", "/embed/image", {"files": {"file": ("cat.jpg", JPEG)}, "headers": AUTH}),
    ("POST", "/embed/image", {"files": {"file": ("cat.jpg", JPEG)}, "data": {"normalize": "false"}, "headers": AUTH}),
    ("POST", "/embed/image/base64", {"json": {"image_base64": DATA_URI}, "headers": AUTH}),
    ("POST", "/embed/images", {"files": [("files", ("a.jpg", JPEG)), ("files", ("b.png", PNG))], "headers": AUTH}),
    ("POST", "/embed/images", {"json": {"images_base64": [B64, DATA_URI, B64]}, "headers": AUTH}),
    ("POST", "/embed/text", {"json": {"text": "a photo of a cat"}, "headers": AUTH}),
    ("POST", "/embed/text", {"json": {"texts": ["a cat", "a dog"], "normalize": False}, "headers": AUTH}),
    ("POST", "/embed/texts", {"json": {"texts": ["a cat", "a dog", "一只猫"]}, "headers": AUTH}),
    (
        "POST",
        "/similarity",
        {
            "files": [("files", ("a.jpg", JPEG)), ("files", ("b.png", PNG))],
            "data": {"texts": '["a cat", "a dog"]'},
            "headers": AUTH,
        },
    ),
    (
        "POST",
        "/rank",
        {"files": [("files", ("a.jpg", JPEG)), ("files", ("b.png", PNG))], "data": {"query": "a sun"}, "headers": AUTH},
    ),
    ("POST", "/v1/embeddings", {"json": {"input": ["a cat", DATA_URI]}, "headers": AUTH}),
    ("POST", "/v1/embeddings", {"json": {"input": "a cat", "encoding_format": "base64"}, "headers": AUTH}),
]

TEXT_CALLS: list[Call] = [
    ("POST", "/embed/text", {"json": {"text": "一只猫在晒太阳"}}),
    ("POST", "/embed/text", {"json": {"texts": ["a cat", "a much longer text about a dog on the sea"]}}),
    ("POST", "/embed/texts", {"json": {"texts": ["x", "a red tree", "the sun"], "normalize": False}}),
    ("POST", "/v1/embeddings", {"json": {"input": ["a cat", "a dog"], "model": "m"}}),
]

BAD_CALLS: list[Call] = [
    ("POST", "/embed/image", {"files": {"file": ("x.jpg", b"")}, "headers": AUTH}),
    ("POST", "/embed/image", {"files": {"file": ("x.txt", b"hello world")}, "headers": AUTH}),
    ("POST", "/embed/image", {"files": {"file": ("x.jpg", b"\xff" * 300_000)}, "headers": AUTH}),
    ("POST", "/embed/image/base64", {"json": {"image_base64": "%%%"}, "headers": AUTH}),
    ("POST", "/embed/images", {"files": [("files", ("a.jpg", JPEG))] * 5, "headers": AUTH}),
    ("POST", "/embed/images", {"content": b"{not json", "headers": {**AUTH, "content-type": "application/json"}}),
    ("POST", "/embed/texts", {"json": {"texts": ["a", None]}, "headers": AUTH}),
    ("POST", "/embed/texts", {"json": {"texts": ["a" * 20_001]}, "headers": AUTH}),
    (  # over max_body_bytes (as bytes: the two clients serialise JSON with different spacing)
        "POST",
        "/embed/texts",
        {"content": b'{"texts": ["' + b"a" * 1_100_000 + b'"]}', "headers": {**AUTH, "content-type": JSON}},
    ),
    ("POST", "/similarity", {"files": [("files", ("a.jpg", JPEG))], "data": {"texts": '["broken'}, "headers": AUTH}),
    ("POST", "/v1/embeddings", {"json": {"input": ["data:image/png;base64,AAAA"]}, "headers": AUTH}),
    ("POST", "/embed/text", {"json": {"text": "a"}}),  # no key
    ("GET", "/info", {"headers": {"Authorization": "Bearer wrong"}}),
    ("GET", "/no/such/route", {"headers": AUTH}),
    ("GET", "/embed/text", {"headers": AUTH}),
]


@pytest.mark.slow
def test_health_info_and_request_ids(cluster: Cluster, image_ref: TestClient, text_ref: TestClient) -> None:
    for base, reference in ((cluster.siglip, image_ref), (cluster.qwen3, text_ref)):
        health = requests.get(base + "/health", timeout=10)
        assert health.status_code == 200 and health.json() == reference.get("/health").json()
        got = requests.get(base + "/info", headers=AUTH, timeout=10).json()
        expected = reference.get("/info", headers=AUTH).json()
        assert got.pop("load_seconds") > 0 and expected.pop("load_seconds") > 0
        assert got == expected
    # one X-Request-ID, the client's when it sends one, else one made by the proxy and seen by the app
    response = requests.post(cluster.siglip + "/embed/text", json={"text": "a"}, headers=AUTH, timeout=10)
    made = response.headers["X-Request-ID"]
    assert "," not in made and len(made) >= 32
    sent = requests.get(cluster.qwen3 + "/health", headers={"X-Request-ID": "abc-123"}, timeout=10)
    assert sent.headers["X-Request-ID"] == "abc-123"
    error = requests.post(cluster.siglip + "/embed/text", json={"text": ""}, headers={**AUTH, "X-Request-ID": "e1"})
    assert error.status_code == 422 and error.headers["X-Request-ID"] == "e1"


@pytest.mark.slow
def test_every_route_matches_the_standalone_service(
    cluster: Cluster, image_ref: TestClient, text_ref: TestClient
) -> None:
    for call in IMAGE_CALLS:
        assert_parity(image_ref, cluster.siglip, call)
    for call in TEXT_CALLS:
        assert_parity(text_ref, cluster.qwen3, call)


@pytest.mark.slow
def test_bad_input_gets_the_same_error_envelope(cluster: Cluster, image_ref: TestClient) -> None:
    for call in BAD_CALLS:
        expected = image_ref.request(call[0], call[1], **call[2])
        got = via_serve(cluster.siglip, call)
        assert 400 <= got.status_code < 500 and got.status_code == expected.status_code, (call[1], got.text)
        assert got.json() == expected.json()
    # /health and /metrics need no key, as on the standalone service
    metrics = requests.get(cluster.siglip + "/metrics", timeout=10)
    assert metrics.status_code == 200 and "embed_requests_total" in metrics.text


@pytest.mark.slow
def test_generated_routes_know_the_prefix(cluster: Cluster) -> None:
    schema = requests.get(cluster.siglip + "/openapi.json", timeout=10).json()
    assert "/embed/image" in schema["paths"]
    docs = requests.get(cluster.siglip + "/docs", timeout=10)
    assert docs.status_code == 200 and "/siglip2/openapi.json" in docs.text
    # outside both prefixes the proxy answers itself
    assert requests.get(cluster.base + "/health", timeout=10).status_code == 404


@pytest.mark.slow
def test_concurrent_requests_match(cluster: Cluster, image_ref: TestClient, text_ref: TestClient) -> None:
    images = [image_bytes(photo_like(40 + i, 36, seed=30 + i), "JPEG") for i in range(8)]
    texts = [f"a photo of {i} cats on the sea" for i in range(8)]
    expected_images = [
        image_ref.post("/embed/image", files={"file": ("x.jpg", data)}, headers=AUTH).json()["embedding"]
        for data in images
    ]
    expected_texts = text_ref.post("/embed/texts", json={"texts": texts}).json()["embeddings"]

    def one(index: int) -> None:
        item = index % 8
        if index % 2:
            response = requests.post(
                cluster.siglip + "/embed/image", files={"file": ("x.jpg", images[item])}, headers=AUTH, timeout=60
            )
            assert response.status_code == 200, response.text
            assert_same(response.json()["embedding"], expected_images[item])
        else:
            response = requests.post(cluster.qwen3 + "/embed/text", json={"text": texts[item]}, timeout=60)
            assert response.status_code == 200, response.text
            assert_same(response.json()["embedding"], expected_texts[item])

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(one, range(96)))


@pytest.mark.slow
def test_openai_client(cluster: Cluster, image_ref: TestClient, text_ref: TestClient) -> None:
    image_client = openai.OpenAI(base_url=cluster.siglip + "/v1", api_key=KEY, max_retries=0)
    result = image_client.embeddings.create(model="siglip", input=["a photo of a cat", DATA_URI])
    expected = image_ref.post("/v1/embeddings", json={"input": ["a photo of a cat", DATA_URI]}, headers=AUTH).json()
    for got, want in zip(result.data, expected["data"], strict=True):
        np.testing.assert_allclose(got.embedding, want["embedding"], atol=2e-5)
    text_client = openai.OpenAI(base_url=cluster.qwen3 + "/v1", api_key="unused", max_retries=0)
    single = text_client.embeddings.create(model="Qwen3-4B", input="a dog", encoding_format="float")
    want = text_ref.post("/embed/text", json={"text": "a dog"}).json()["embedding"]
    np.testing.assert_allclose(single.data[0].embedding, want, atol=2e-5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=cluster.siglip + "/v1", api_key="wrong", max_retries=0).embeddings.create(
            model="m", input="a"
        )


@pytest.mark.slow
def test_embed_client_and_the_indexer(cluster: Cluster, image_ref: TestClient, tmp_path: Path) -> None:
    photos = [image_bytes(photo_like(48 + i, 40, seed=50 + i), "JPEG") for i in range(7)]
    expected = np.asarray(
        [
            image_ref.post("/embed/image", files={"file": ("x.jpg", data)}, headers=AUTH).json()["embedding"]
            for data in photos
        ],
        dtype=np.float32,
    )
    with EmbedClient(cluster.siglip, api_key=KEY) as client:
        assert client.health()["status"] == "ok"
        np.testing.assert_allclose(client.embed_images(photos), expected, atol=2e-5)  # 7 images, 4 per request
        texts = client.embed_texts(["a cat", "a dog"])
        want = image_ref.post("/embed/texts", json={"texts": ["a cat", "a dog"]}, headers=AUTH).json()["embeddings"]
        np.testing.assert_allclose(texts, want, atol=2e-5)

    folder, out = tmp_path / "photos", tmp_path / "vectors.parquet"
    for index, data in enumerate(photos):
        (folder / f"d{index % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"d{index % 2}" / f"p{index}.jpg").write_bytes(data)
    command = [sys.executable, "-m", "embed_client", "index", str(folder), "--out", str(out)]
    command += ["--url", cluster.siglip, "--api-key", KEY, "--no-progress"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "7 embedded" in result.stdout
    rows = {row["path"]: row["vector"] for row in pq.read_table(out).to_pylist()}
    got = np.asarray([rows[f"d{index % 2}/p{index}.jpg"] for index in range(7)], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=2e-5)


def _held_load(gates: Path, settings: ServiceSettings) -> EmbeddingModel:
    """Loads the model once the test lets it: the first replica to get here waits for ``gates/1``, the second for
    ``gates/2``. Runs in the replicas (imported from this module)."""
    for number in (1, 2):
        try:
            (gates / f"loading-{number}").touch(exist_ok=False)
            break
        except FileExistsError:
            continue
    while not (gates / str(number)).exists():
        time.sleep(0.05)
    assert isinstance(settings, Siglip2Settings)
    model: Siglip2Service = load(settings)
    return model


@pytest.mark.slow
def test_no_request_reaches_a_replica_that_is_loading(
    cluster: Cluster, tiny_siglip: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from ray import serve

    gates = tmp_path_factory.mktemp("gates")
    held = application(
        "siglip2",
        {"model": str(tiny_siglip), "device": "cpu", "log_level": "warning"},
        load=functools.partial(_held_load, gates),
        num_replicas=2,
        ray_actor_options={"num_cpus": 0.25},
    )
    deploying = threading.Thread(target=serve.run, args=(held,), kwargs={"name": "held", "route_prefix": "/held"})
    deploying.start()
    try:
        url = cluster.base + "/held"
        wait_for(lambda: (gates / "loading-2").exists(), 120, "both replicas to start loading")
        # Nothing is ready: the proxy holds the request rather than sending it to a loading replica.
        held_health = requests.get(url + "/health", headers={"X-Request-Timeout-Seconds": "1"}, timeout=30)
        assert held_health.status_code == 408, held_health.text
        (gates / "1").touch()
        # One replica is ready, the other loads: /health says so, while requests are served.
        wait_for(lambda: requests.get(url + "/health", timeout=60).status_code == 503, 60, "the first replica")
        health = requests.get(url + "/health", timeout=60)
        assert health.json() == {"status": "loading", "replicas": {"RUNNING": 1, "STARTING": 1}}, health.text
        assert replica_states("held", "siglip2") == {"RUNNING": 1, "STARTING": 1}
        # Every request goes to the ready replica; the loading one would have answered 503 "not_ready".
        codes = collections.Counter(
            requests.post(url + "/embed/text", json={"text": f"t{i}"}, timeout=30).status_code for i in range(30)
        )
        assert codes == {200: 30}
        assert replica_states("held", "siglip2") == {"RUNNING": 1, "STARTING": 1}
        (gates / "2").touch()
        deploying.join(timeout=120)
        assert replica_states("held", "siglip2") == {"RUNNING": 2}
        wait_for(lambda: requests.get(url + "/health", timeout=60).status_code == 200, 10, "every replica ready")
    finally:
        (gates / "1").touch()
        (gates / "2").touch()
        deploying.join(timeout=120)
        serve.delete("held")


@pytest.mark.slow
def test_a_killed_replica_is_replaced(cluster: Cluster) -> None:
    """Only the requests in flight on the killed replica fail (Serve answers them 500, not in the envelope); Serve
    starts a new replica and the load goes on."""
    import ray

    def replicas() -> set[str]:
        actors = ray.util.list_named_actors(all_namespaces=True)
        return {actor["name"] for actor in actors if actor["name"].startswith("SERVE_REPLICA::siglip2#")}

    before = replicas()
    assert len(before) == 2
    results: collections.Counter[int | str] = collections.Counter()
    stop = threading.Event()
    threads = 8

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                response = session.post(
                    cluster.siglip + "/embed/texts", json={"texts": ["a cat", "a dog"]}, headers=AUTH, timeout=60
                )
                results[response.status_code] += 1
            except requests.RequestException as exc:
                results[type(exc).__name__] += 1

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        wait_for(lambda: results[200] >= 50, 60, "load")
        victim = sorted(before)[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = time.monotonic()
        wait_for(
            lambda: len(replicas() - before) == 1 and replica_states("siglip2") == {"RUNNING": 2},
            150,
            "a new replica",
        )
        replaced_after = time.monotonic() - killed_at
        served_at_replacement = results[200]
        wait_for(lambda: results[200] >= served_at_replacement + 50, 60, "load on the new set of replicas")
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    failures = {status: count for status, count in results.items() if status != 200}
    sys.stderr.write(f"killed replica: {dict(results)}, replaced after {replaced_after:.1f} s\n")
    # at most the requests that were in flight on it: each client has one request in flight at a time
    assert sum(failures.values()) <= threads and set(failures) <= {500}, failures
